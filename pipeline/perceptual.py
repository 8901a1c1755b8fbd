"""The perceptual distance of latent diffusion's autoencoder loss: LPIPS (Zhang et al. 2018, "The
Unreasonable Effectiveness of Deep Features as a Perceptual Metric") over VGG16 features, as the
`LPIPSWithDiscriminator` loss of taming-transformers and latent diffusion uses it.

The network and its learned per-channel weights (the v0.1 "lin" layers) are the `lpips` package's,
which ships the latter. The VGG16 backbone's ImageNet weights come from a file at a local path,
nothing being downloaded at run time: torchvision's `vgg16-397923af.pth`, or any torchvision VGG16
state dict (.pth or .safetensors), of which the `features.*` entries are used.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import safetensors.torch
import torch
from torch import nn


def lpips_vgg(backbone: str | Path) -> nn.Module:
    """LPIPS-VGG (`lpips.LPIPS`) with the VGG16 weights of the torchvision state dict in file
    `backbone`, frozen and in eval mode. Called on two batches of images in [-1, 1], it returns
    their distances (B, 1, 1, 1); 0 for identical images."""
    import lpips

    path = Path(backbone)
    state = safetensors.torch.load_file(path) if path.suffix == ".safetensors" else \
        torch.load(path, map_location="cpu", weights_only=True)
    with warnings.catch_warnings():  # lpips calls torchvision's vgg16 with the deprecated `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)  # its lin layers; VGG random
    wanted = {}
    for key, value in model.net.state_dict().items():  # 'slice{k}.{index}.{weight|bias}', index into vgg16.features
        source = "features." + key.split(".", 1)[1]
        if source not in state or state[source].shape != value.shape:
            raise ValueError(f"{path} is not a torchvision VGG16 state dict: {source!r} is missing or of another shape")
        wanted[key] = state[source]
    model.net.load_state_dict(wanted)
    return model.requires_grad_(False).eval()
