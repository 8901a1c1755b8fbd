"""Variational autoencoder (Kingma & Welling 2014, "Auto-Encoding Variational Bayes") and
beta-VAE (Higgins et al. 2017, "beta-VAE: Learning Basic Visual Concepts with a Constrained
Variational Framework").

The encoder q(z|x) = N(mu, diag(exp(logvar))) and the decoder p(x|z) are trained on the negative
beta-weighted evidence lower bound, per image summed over pixels and latent dimensions:

    L(x) = -E_q(z|x)[log p(x|z)] + beta * KL(q(z|x) || N(0, I)),

with one reparameterised sample z = mu + exp(0.5 * logvar) * eps, eps ~ N(0, I). beta = 1 is
exactly the VAE; beta > 1 is the beta-VAE. The decoder output is the mean of p(x|z) with a fixed
scale `recon_sigma` and the normalising constant dropped:
    gaussian: -log p(x|z) = 0.5 * ||x - x_hat||^2 / sigma^2,   laplace: ||x - x_hat||_1 / sigma.
sigma = 0.1 on images in [-1, 1] makes one nat of KL cost as much as a 0.14 error on one pixel, so
the KL shapes the latent space without swamping the reconstruction.

The conv blocks, Encoder and Decoder here are shared with the conditional VAE (cvae.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from pipeline.models.reduction import valid_mean
from pipeline.ranges import NonNegativeFloat, PositiveFloat, PositiveInt


@dataclass
class VAEConfig:
    image_size: PositiveInt = 64  # divisible by 2 ** len(channel_mult)
    channels: PositiveInt = 32  # width of the first conv stage
    channel_mult: tuple[PositiveInt, ...] = (1, 2, 4)  # one stride-2 stage per entry
    latent_dim: PositiveInt = 32
    beta: NonNegativeFloat = 1.0  # weight on the KL; beta = 1 is exactly the VAE
    recon: Literal["gaussian", "laplace"] = "gaussian"
    recon_sigma: PositiveFloat = 0.1  # fixed decoder scale (Gaussian std or Laplace b), images in [-1, 1]

    def validate(self) -> None:
        check_stages(self.image_size, self.channel_mult)


def check_stages(image_size: int, channel_mult: tuple[int, ...]) -> None:
    """The shape the conv stacks of Encoder and Decoder need: at least one stride-2 stage, and an
    image side they halve exactly."""
    if not channel_mult:
        raise ValueError("channel_mult is empty: it needs one entry per stride-2 stage")
    if image_size % 2 ** len(channel_mult):
        raise ValueError(f"image_size {image_size} is not divisible by 2 ** {len(channel_mult)}")


def gaussian_kl(mu: Tensor, logvar: Tensor, prior_mu: Tensor | None = None,
                prior_logvar: Tensor | None = None) -> Tensor:
    """Analytic KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))) between diagonal
    Gaussians, (B, D) -> (B,) summed over D. Without a prior it is against N(0, I)."""
    if prior_mu is None:
        return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
    return 0.5 * (prior_logvar - logvar + (logvar.exp() + (mu - prior_mu).pow(2)) / prior_logvar.exp()
                  - 1).sum(1)


def reparameterise(mu: Tensor, logvar: Tensor, eps: Tensor | None = None) -> Tensor:
    """z = mu + exp(0.5 * logvar) * eps, a sample of N(mu, exp(logvar)) differentiable in mu and
    logvar; eps is a fresh N(0, I) draw unless given."""
    return mu + (0.5 * logvar).exp() * (torch.randn_like(mu) if eps is None else eps)


def standard_normal(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> Tensor:
    """N(0, I) draws on `device`; drawn on the generator's device so a CPU generator reproduces the
    same samples on any accelerator."""
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source).to(device)


def reconstruction_nll(x: Tensor, x_hat: Tensor, kind: str, sigma: float) -> Tensor:
    """-log p(x|z) up to a constant, (B, C, H, W) -> (B,) summed over pixels."""
    if kind == "gaussian":
        return 0.5 * ((x - x_hat) / sigma).pow(2).flatten(1).sum(1)
    if kind == "laplace":
        return ((x - x_hat).abs() / sigma).flatten(1).sum(1)
    raise ValueError(f"recon must be 'gaussian' or 'laplace', got {kind!r}")


@torch.no_grad()
def psnr(x: Tensor, x_hat: Tensor, valid: Tensor) -> Tensor:
    """Mean PSNR in dB over valid samples, on images mapped from [-1, 1] to [0, 1]."""
    mse = ((x - x_hat.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return valid_mean(-10 * torch.log10(mse.clamp(min=1e-10)), valid)


def conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv + GroupNorm (up to 8 groups that divide c_out) + SiLU; stride 2 halves the resolution."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1),
                         nn.GroupNorm(math.gcd(8, c_out), c_out), nn.SiLU())


class Encoder(nn.Module):
    """Image (B, 3, R, R), optionally with a condition vector (B, cond_dim), -> (mu, logvar), each
    (B, latent_dim). The condition joins the flattened conv features before the linear head."""

    def __init__(self, image_size: int, channels: int, channel_mult: tuple[int, ...], latent_dim: int,
                 cond_dim: int = 0) -> None:
        super().__init__()
        check_stages(image_size, channel_mult)
        widths = [channels * mult for mult in channel_mult]
        side = image_size // 2 ** len(widths)
        c_ins = [3, *widths[:-1]]
        self.features = nn.Sequential(*[conv_block(c_in, width, stride=2) for c_in, width in zip(c_ins, widths)])
        self.head = nn.Linear(widths[-1] * side * side + cond_dim, 2 * latent_dim)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = self.features(x).flatten(1)  # (B, C * s * s)
        if cond is not None:
            h = torch.cat([h, cond], 1)
        mu, logvar = self.head(h).chunk(2, 1)  # (B, D) each
        return mu, logvar


class Decoder(nn.Module):
    """Latent (B, latent_dim), optionally with a condition vector (B, cond_dim), -> image mean
    (B, 3, R, R). It mirrors Encoder with nearest upsampling; the output is left unbounded
    because it is the mean of p(x|z), and a tanh would saturate on fully saturated colours."""

    def __init__(self, image_size: int, channels: int, channel_mult: tuple[int, ...], latent_dim: int,
                 cond_dim: int = 0) -> None:
        super().__init__()
        widths = [channels * mult for mult in channel_mult]
        self.side, self.width = image_size // 2 ** len(widths), widths[-1]
        self.project = nn.Linear(latent_dim + cond_dim, self.width * self.side ** 2)
        stages = []
        for c_in, width in zip(reversed(widths[1:]), reversed(widths[:-1])):
            stages += [nn.Upsample(scale_factor=2, mode="nearest"), conv_block(c_in, width)]
        # The last stage mirrors the encoder's first (3 -> widths[0], stride 2) as a plain conv.
        self.stages = nn.Sequential(*stages, nn.Upsample(scale_factor=2, mode="nearest"),
                                    nn.Conv2d(widths[0], 3, 3, 1, 1))

    def forward(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is not None:
            z = torch.cat([z, cond], 1)
        h = self.project(z).view(-1, self.width, self.side, self.side)  # (B, C, s, s)
        return self.stages(h)  # (B, 3, R, R)


class VAE(nn.Module):
    """The VAE, or the beta-VAE when cfg.beta != 1."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        shape = (cfg.image_size, cfg.channels, cfg.channel_mult, cfg.latent_dim)
        self.encoder, self.decoder = Encoder(*shape), Decoder(*shape)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Image (B, 3, R, R) -> the parameters (mu, logvar) of q(z|x), each (B, latent_dim)."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Latent (B, latent_dim) -> mean of p(x|z), (B, 3, R, R), not clamped."""
        return self.decoder(z)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """`loss` = mean over valid samples of recon + beta * kl; `recon`, `kl` and `psnr` detached."""
        x, valid = batch["image"], batch["valid"]  # (B, 3, R, R), (B,)
        mu, logvar = self.encode(x)
        x_hat = self.decode(reparameterise(mu, logvar))
        recon = reconstruction_nll(x, x_hat, self.cfg.recon, self.cfg.recon_sigma)  # (B,)
        kl = gaussian_kl(mu, logvar)  # (B,)
        return {"loss": valid_mean(recon + self.cfg.beta * kl, valid),
                "recon": valid_mean(recon, valid).detach(), "kl": valid_mean(kl, valid).detach(),
                "psnr": psnr(x, x_hat, valid)}

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """Decode the mean of q(z|x); (B, 3, R, R) in [-1, 1]."""
        return self.decode(self.encode(images)[0]).clamp(-1, 1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n images (n, 3, R, R) in [-1, 1] decoded from z ~ N(0, I)."""
        device = next(self.parameters()).device
        return self.decode(standard_normal((n, self.cfg.latent_dim), device, generator)).clamp(-1, 1)
