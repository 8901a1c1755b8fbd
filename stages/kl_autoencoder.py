"""The `kl_autoencoder` stage: latent diffusion's KL autoencoder on the images (captions unused)."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from torch import nn

from pipeline.engine.config import TrainConfig
from pipeline.engine.loop import exit_code, train
from pipeline.images import reconstructions
from pipeline.models.kl_autoencoder import KLAutoencoder, KLAutoencoderConfig
from pipeline.perceptual import lpips_vgg

OUTPUT = "trainer.out_dir"


@dataclass
class Config(TrainConfig):
    model: KLAutoencoderConfig = field(default_factory=KLAutoencoderConfig)


def build_model(cfg: Config, training: bool = False) -> nn.Module:
    """The task; for `training` with model.perceptual_weight > 0 it carries LPIPS, whose VGG16 weights
    the decoder alone (sampling, the latents stage) never needs."""
    m = cfg.model
    return KLAutoencoder(m, lpips_vgg(m.perceptual_backbone) if training and m.perceptual_weight else None)


def run(cfg: Config) -> int:
    if cfg.model.perceptual_weight and not Path(cfg.model.perceptual_backbone).is_file():
        raise ValueError(f"model.perceptual_backbone: no file {cfg.model.perceptual_backbone!r} (a torchvision VGG16 "
                         "state dict such as vgg16-397923af.pth)")
    return exit_code(train(cfg, partial(build_model, training=True), reconstructions))
