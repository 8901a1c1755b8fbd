"""Conditional VAE, GSNN and their hybrid (Sohn, Lee & Yan 2015, "Learning Structured Output
Representation using Deep Conditional Generative Models"), generating an image x from a caption y.

Three networks: the recognition network q(z|x,y), the conditional prior network p(z|y) and the
generation network p(x|y,z), with y the TextEncoder's caption embedding. Per image, summed over
pixels and latent dimensions:

    L_CVAE = -log p(x|y,z),  z ~ q(z|x,y)   +   KL(q(z|x,y) || p(z|y))
    L_GSNN = -log p(x|y,z),  z ~ p(z|y)
    L_hybrid = alpha * L_CVAE + (1 - alpha) * L_GSNN

alpha = 1 is exactly the CVAE, alpha = 0 the GSNN. The GSNN term trains the generator on the
latents it will see at test time, when z comes from p(z|y). -log p(x|y,z) is the fixed-scale
Gaussian of vae.py: 0.5 * ||x - x_hat||^2 / recon_sigma^2.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pipeline.models.reduction import valid_mean
from pipeline.models.text import TextEncoder, TextEncoderConfig
from pipeline.models.vae import (
    Decoder,
    Encoder,
    check_stages,
    gaussian_kl,
    psnr,
    reconstruction_nll,
    reparameterise,
    standard_normal,
)
from pipeline.ranges import Fraction, PositiveFloat, PositiveInt


@dataclass
class CVAEConfig:
    image_size: PositiveInt = 64  # divisible by 2 ** len(channel_mult)
    channels: PositiveInt = 32
    channel_mult: tuple[PositiveInt, ...] = (1, 2, 4)
    latent_dim: PositiveInt = 32
    recon_sigma: PositiveFloat = 0.1  # fixed std of the Gaussian p(x|y,z), images in [-1, 1]
    alpha: Fraction = 0.5  # hybrid weight: alpha = 1 is exactly the CVAE loss, alpha = 0 the GSNN
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def validate(self) -> None:
        check_stages(self.image_size, self.channel_mult)


class PriorNetwork(nn.Module):
    """p(z|y): caption embedding (B, width) -> (mu_p, logvar_p), each (B, latent_dim)."""

    def __init__(self, width: int, latent_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2 * latent_dim))

    def forward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.net(y).chunk(2, 1)
        return mu, logvar


class CVAE(nn.Module):
    """The hybrid CVAE/GSNN objective; `sample` draws z from the prior network p(z|y)."""

    def __init__(self, cfg: CVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        shape = (cfg.image_size, cfg.channels, cfg.channel_mult, cfg.latent_dim)
        self.text = TextEncoder(cfg.text)
        self.recognition = Encoder(*shape, cond_dim=cfg.text.width)  # q(z|x,y)
        self.prior = PriorNetwork(cfg.text.width, cfg.latent_dim)  # p(z|y)
        self.generator = Decoder(*shape, cond_dim=cfg.text.width)  # p(x|y,z)

    def _nll(self, x: Tensor, x_hat: Tensor) -> Tensor:
        return reconstruction_nll(x, x_hat, "gaussian", self.cfg.recon_sigma)  # (B,)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """`loss` = mean over valid samples of alpha * L_CVAE + (1 - alpha) * L_GSNN. Detached:
        `recon` and `kl` (the CVAE path's terms), `loss_cvae`, `loss_gsnn`, `psnr` (CVAE path).
        Noise is drawn for the CVAE path first, then for the GSNN path."""
        x, valid = batch["image"], batch["valid"]  # (B, 3, R, R), (B,)
        y = self.text(batch["tokens"])  # (B, W)
        mu_q, logvar_q = self.recognition(x, y)  # (B, D) each
        mu_p, logvar_p = self.prior(y)  # (B, D) each
        x_cvae = self.generator(reparameterise(mu_q, logvar_q), y)  # (B, 3, R, R)
        x_gsnn = self.generator(reparameterise(mu_p, logvar_p), y)  # (B, 3, R, R)
        recon = self._nll(x, x_cvae)
        kl = gaussian_kl(mu_q, logvar_q, mu_p, logvar_p)
        loss_cvae, loss_gsnn = recon + kl, self._nll(x, x_gsnn)  # (B,) each
        alpha = self.cfg.alpha
        logged = {"recon": recon, "kl": kl, "loss_cvae": loss_cvae, "loss_gsnn": loss_gsnn}
        return {"loss": valid_mean(alpha * loss_cvae + (1 - alpha) * loss_gsnn, valid),
                **{name: valid_mean(value, valid).detach() for name, value in logged.items()},
                "psnr": psnr(x, x_cvae, valid)}

    @torch.no_grad()
    def reconstruct(self, images: Tensor, tokens: Tensor) -> Tensor:
        """Decode the mean of q(z|x,y) for images (B, 3, R, R) and their captions' tokens (B, L);
        (B, 3, R, R) in [-1, 1]. Unlike the VAE's, it needs the captions: q is conditioned on y."""
        y = self.text(tokens)
        return self.generator(self.recognition(images, y)[0], y).clamp(-1, 1)

    @torch.no_grad()
    def sample(self, tokens: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One image per caption, (n, 3, R, R) in [-1, 1], from z ~ p(z|y) for tokens (n, L)."""
        y = self.text(tokens)
        mu_p, logvar_p = self.prior(y)
        z = reparameterise(mu_p, logvar_p, standard_normal(tuple(mu_p.shape), mu_p.device, generator))
        return self.generator(z, y).clamp(-1, 1)
