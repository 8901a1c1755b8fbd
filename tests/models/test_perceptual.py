"""LPIPS for the KL autoencoder: VGG16 weights from a local file, the distance as the paper defines
it, and its place in the autoencoder's loss (frozen, outside the saved weights)."""
from pathlib import Path

import pytest
import torch
from torchvision.models.vgg import cfgs, make_layers

from pipeline.models.kl_autoencoder import KLAutoencoder, KLAutoencoderConfig
from pipeline.perceptual import lpips_vgg
from tests.models.test_kl_autoencoder import TINY, _batch

RELU_OUTPUTS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of vgg16.features


def write_vgg16(path: Path) -> Path:
    """A randomly initialised torchvision VGG16 state dict (its features), as vgg16-397923af.pth holds them."""
    torch.manual_seed(0)
    torch.save({f"features.{key}": value for key, value in make_layers(cfgs["D"]).state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory) -> Path:
    return write_vgg16(tmp_path_factory.mktemp("vgg") / "vgg16.pth")


def _reference_lpips(vgg_file: Path, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Zhang et al.'s formula written out: channel-normalised VGG16 activations, squared differences
    weighted by the lpips package's v0.1 lin layers, averaged over space, summed over layers."""
    import lpips

    features = make_layers(cfgs["D"])
    features.load_state_dict({key.removeprefix("features."): value
                              for key, value in torch.load(vgg_file, weights_only=True).items()})
    lins = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth", map_location="cpu", weights_only=True)
    shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
    scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)
    a, b, total = (x - shift) / scale, (y - shift) / scale, 0.0
    for index, layer in enumerate(features[:RELU_OUTPUTS[-1] + 1]):
        a, b = layer(a), layer(b)
        if index in RELU_OUTPUTS:
            k = RELU_OUTPUTS.index(index)
            unit_a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            unit_b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            weights = lins[f"lin{k}.model.1.weight"]
            total = total + ((unit_a - unit_b).pow(2) * weights.view(1, -1, 1, 1)).sum(1).mean((1, 2))
    return total


def test_lpips_uses_the_vgg_weights_of_the_local_file_and_the_papers_formula(vgg_file):
    network = lpips_vgg(vgg_file)
    torch.manual_seed(1)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        distance = network(x, y).flatten()
        assert torch.allclose(distance, _reference_lpips(vgg_file, x, y), rtol=1e-4)
        assert network(x, x).abs().max() < 1e-6 and (distance > 0).all()
    assert not any(p.requires_grad for p in network.parameters())


def test_a_file_that_is_not_a_vgg16_state_dict_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match="is not a torchvision VGG16 state dict: 'features.0.weight'"):
        lpips_vgg(path)


def test_the_autoencoder_loss_adds_lpips_at_every_pixel_and_keeps_the_network_out_of_its_weights(vgg_file):
    cfg = KLAutoencoderConfig(**TINY, perceptual_weight=0.5, perceptual_backbone=str(vgg_file))
    network = lpips_vgg(vgg_file)
    task = KLAutoencoder(cfg, network)
    batch = _batch()
    torch.manual_seed(1)
    out = task(batch)
    torch.manual_seed(1)  # the same latent draw
    posterior = task.encode(batch["image"])
    x_hat = task.decode(posterior.sample())
    distance = network(batch["image"], x_hat).flatten()
    per_image = (batch["image"] - x_hat).abs().flatten(1).sum(1) + 0.5 * distance * 3 * 16 * 16 + 1e-6 * posterior.kl()
    assert torch.allclose(out["loss"], per_image.mean(), rtol=1e-5)
    assert torch.allclose(out["lpips"], distance.mean())
    out["loss"].backward()
    assert task.autoencoder.decoder.conv_out.weight.grad.abs().sum() > 0
    assert not any(key.startswith("_perceptual") or "lin" in key for key in task.state_dict())
    assert sum(p.numel() for p in task.parameters()) == sum(p.numel() for p in task.autoencoder.parameters())
    with pytest.raises(ValueError, match="without its LPIPS network"):
        KLAutoencoder(cfg)(batch)  # built to decode (load_run): no VGG file read, and no silent loss without LPIPS
