"""Latent diffusion's KL autoencoder task: the loss as the paper writes it, the adaptive weight,
the discriminator's phases and start step, and learning on a fixed batch."""
import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.models.kl_autoencoder import AUTOENCODER, DISCRIMINATOR, KLAutoencoder, KLAutoencoderConfig

TINY = dict(image_size=16, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, disc_layers=2,
            disc_channels=8)


def _batch(n: int = 4, valid: list[bool] | None = None) -> dict:
    torch.manual_seed(0)
    return {"image": torch.rand(n, 3, 16, 16) * 2 - 1,
            "valid": torch.tensor(valid if valid is not None else [True] * n)}


def test_the_loss_is_the_summed_l1_plus_weighted_kl_over_valid_images():
    task = KLAutoencoder(KLAutoencoderConfig(**TINY, kl_weight=0.01))
    batch = _batch(valid=[True, True, True, False])
    torch.manual_seed(1)
    out = task(batch)
    torch.manual_seed(1)  # the same latent draw
    posterior = task.encode(batch["image"])
    x_hat = task.decode(posterior.sample())
    per_image = (batch["image"] - x_hat).abs().flatten(1).sum(1) + 0.01 * posterior.kl()
    assert torch.allclose(out["loss"], per_image[:3].mean(), rtol=1e-5)
    assert {"l1", "kl", "psnr", "latent_std"} <= set(out) and task.phases().keys() == {"train"}
    assert posterior.mean.shape == (4, 4, 8, 8)  # f = 2 for two blocks, 4 latent channels


def test_the_discriminator_counts_only_from_its_start_step_with_the_adaptive_weight():
    task = KLAutoencoder(KLAutoencoderConfig(**TINY, disc_weight=0.5, disc_start=10))
    assert set(task.phases()) == {AUTOENCODER, DISCRIMINATOR}
    batch = _batch()
    before = task(batch, phase=DISCRIMINATOR)
    assert before["loss"].item() == 0 and "generator_loss" not in task(batch, phase=AUTOENCODER)
    before["loss"].backward()
    assert all(not p.grad.any() for p in task.discriminator.parameters())  # it stays where it is
    task.after_step(10)
    out = task(batch, phase=AUTOENCODER)
    assert out["adaptive_weight"] > 0 and torch.isfinite(out["loss"])
    hinge = task(batch, phase=DISCRIMINATOR)
    assert hinge["loss"] > 0 and {"logits_real", "logits_fake"} <= set(hinge)


def test_the_adaptive_weight_balances_the_gradients_at_the_last_layer():
    task = KLAutoencoder(KLAutoencoderConfig(**TINY, disc_weight=0.5, disc_start=0))
    x = _batch()["image"]
    x_hat = task.decode(task.encode(x).mode())
    reconstruction, generator = (x - x_hat).abs().flatten(1).sum(1).mean(), -task.discriminator(x_hat).mean()
    last = task.autoencoder.decoder.conv_out.weight
    rec_grad = torch.autograd.grad(reconstruction, last, retain_graph=True)[0].norm()
    gan_grad = torch.autograd.grad(generator, last, retain_graph=True)[0].norm()
    assert torch.allclose(task._adaptive_weight(reconstruction, generator), 0.5 * rec_grad / (gan_grad + 1e-4))


def test_the_autoencoder_learns_a_fixed_batch():
    torch.manual_seed(0)
    task = KLAutoencoder(KLAutoencoderConfig(**TINY))
    smooth = torch.nn.functional.interpolate(torch.rand(8, 3, 4, 4) * 2 - 1, size=16, mode="bilinear")
    batch = {"image": smooth, "valid": torch.ones(8, dtype=torch.bool)}
    optimizer = torch.optim.AdamW(task.parameters(), lr=3e-3)
    first = task(batch)["psnr"].item()
    for _ in range(60):
        loss = task(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert task(batch)["psnr"].item() > first + 3
    assert task.reconstruct(batch["image"]).shape == (8, 3, 16, 16)


@pytest.mark.parametrize("bad, message", [("image_size=17", "not divisible"), ("norm_num_groups=3", "must divide"),
                                          ("block_out_channels=[]", "empty")])
def test_shapes_that_cannot_be_built_are_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        load_config(KLAutoencoderConfig, overrides=["image_size=16", "block_out_channels=[8,16]", "norm_num_groups=4", bad])


def test_bf16_decoding_and_reconstruction_are_finite():
    task = KLAutoencoder(KLAutoencoderConfig(**TINY)).to(torch.bfloat16)
    latents = 3 * torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)  # beyond the posterior's usual range
    with torch.no_grad():
        decoded, rebuilt = task.decode(latents), task.reconstruct(_batch()["image"].to(torch.bfloat16))
    assert decoded.dtype == torch.bfloat16 and torch.isfinite(decoded).all() and torch.isfinite(rebuilt).all()
