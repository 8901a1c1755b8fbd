"""VQ-VAE-2 (Razavi et al. 2019, "Generating Diverse High-Fidelity Images with VQ-VAE-2").

Two levels of codes (section 3.1, figure 2a). The bottom encoder maps x (B, 3, R, R) to features
at R/4; the top encoder maps those to R/8, where they are quantised to z_top. A top decoder
upsamples z_top back to R/4 and its output joins the bottom features before they are quantised
to z_bottom, so the bottom codes are conditioned on the top ones and hold what those leave out.
The decoder reads z_bottom together with z_top upsampled to R/4. Per image, summed over pixels
and over the positions of both levels, each level with its own K-entry codebook (vq.py):

    L(x) = recon(x, x_hat) + sum_{l = top, bottom} ||sg[z_e^l] - e^l||^2 + beta * ||z_e^l - sg[e^l]||^2,

with EMA codebooks by default, as in the paper. Sampling is hierarchical: a prior over the top codes,
then one over the bottom codes given the top, both separate models; decode(top, bottom) renders
their samples. The building blocks and reconstruction losses are VQ-VAE's (vqvae.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from pipeline.models.reduction import valid_mean
from pipeline.models.vae import psnr
from pipeline.models.vqvae import IMAGE_CHANNELS, Decoder, Encoder, Width, make_quantizer, reconstruction_error
from pipeline.ranges import Decay, NonNegativeFloat, NonNegativeInt, PositiveInt


@dataclass
class VQVAE2Config:
    image_size: PositiveInt = 64  # divisible by 8: the top grid is R / 8, the bottom R / 4
    channels: Width = 128  # width of the encoders and decoders
    res_blocks: NonNegativeInt = 2
    res_channels: PositiveInt = 32  # inner width of a residual block
    code_dim: PositiveInt = 64  # D, both levels
    codebook_size: PositiveInt = 512  # K, each level
    beta: NonNegativeFloat = 0.25  # commitment weight
    ema: bool = True  # EMA codebook updates instead of the codebook loss terms
    decay: Decay = 0.99
    dead_code_threshold: NonNegativeFloat = 1.0  # restart codes used less than this per batch on average
    restart: bool = True
    recon: Literal["mse", "laplace"] = "mse"

    def validate(self) -> None:
        if self.image_size % 8:
            raise ValueError(f"image_size {self.image_size} is not divisible by 8")
        if self.recon not in ("mse", "laplace"):
            raise ValueError(f"recon must be 'mse' or 'laplace', got {self.recon!r}")


class VQVAE2(nn.Module):
    """The two-level VQ-VAE-2: encode -> (top, bottom) codes, decode(top, bottom) -> images."""

    def __init__(self, cfg: VQVAE2Config) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        c, d, blocks = cfg.channels, cfg.code_dim, (cfg.res_blocks, cfg.res_channels)
        self.encoder_bottom = Encoder(IMAGE_CHANNELS, c, 2, *blocks)  # R -> R/4
        self.encoder_top = Encoder(c, c, 1, *blocks)  # R/4 -> R/8
        self.pre_quantize_top = nn.Conv2d(c, d, 1)
        self.quantizer_top = make_quantizer(cfg)
        self.decoder_top = Decoder(d, d, c, 1, *blocks)  # z_top to R/4, to condition the bottom
        self.pre_quantize_bottom = nn.Conv2d(c + d, d, 1)
        self.quantizer_bottom = make_quantizer(cfg)
        self.upsample_top = nn.ConvTranspose2d(d, d, 4, 2, 1)
        self.decoder = Decoder(2 * d, IMAGE_CHANNELS, c, 2, *blocks)  # R/4 -> R

    @property
    def top_side(self) -> int:
        return self.cfg.image_size // 8

    @property
    def bottom_side(self) -> int:
        return self.cfg.image_size // 4

    def _bottom_latent(self, h_bottom: Tensor, z_top: Tensor) -> Tensor:
        """Bottom features (B, C, R/4, R/4) and quantised top (B, D, R/8, R/8) -> z_e bottom (B, D, R/4, R/4)."""
        return self.pre_quantize_bottom(torch.cat([self.decoder_top(z_top), h_bottom], 1))

    def _decode(self, z_top: Tensor, z_bottom: Tensor) -> Tensor:
        """Quantised top (B, D, R/8, R/8) and bottom (B, D, R/4, R/4) -> x_hat (B, 3, R, R)."""
        return self.decoder(torch.cat([self.upsample_top(z_top), z_bottom], 1))

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """`loss` = mean over valid samples of recon + both levels' vq losses, each per image summed
        over pixels or positions. The rest are detached: `recon`, `vq_top`, `vq_bottom`, `psnr`
        (dB, [0, 1] images), and `perplexity_*` and `dead_codes_*` of each level's valid codes."""
        x, valid = batch["image"], batch["valid"]  # (B, 3, R, R), (B,)
        h_bottom = self.encoder_bottom(x)  # (B, C, R/4, R/4)
        top = self.quantizer_top(self.pre_quantize_top(self.encoder_top(h_bottom)), valid)  # z_q (B, D, R/8, R/8)
        bottom = self.quantizer_bottom(self._bottom_latent(h_bottom, top.z_q), valid)  # z_q (B, D, R/4, R/4)
        x_hat = self._decode(top.z_q, bottom.z_q)  # (B, 3, R, R)
        recon = reconstruction_error(x, x_hat, self.cfg.recon)  # (B,)
        return {"loss": valid_mean(recon + top.loss + bottom.loss, valid),
                "recon": valid_mean(recon, valid).detach(), "vq_top": valid_mean(top.loss, valid).detach(),
                "vq_bottom": valid_mean(bottom.loss, valid).detach(), "psnr": psnr(x, x_hat, valid),
                "perplexity_top": top.perplexity, "perplexity_bottom": bottom.perplexity,
                "dead_codes_top": top.dead_codes, "dead_codes_bottom": bottom.dead_codes}

    @torch.no_grad()
    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, 3, R, R) in [-1, 1] -> codes top (B, R/8, R/8) and bottom (B, R/4, R/4)."""
        h_bottom = self.encoder_bottom(images)
        top = self.quantizer_top.assign(self.pre_quantize_top(self.encoder_top(h_bottom)))
        bottom = self.quantizer_bottom.assign(self._bottom_latent(h_bottom, self.quantizer_top.lookup(top)))
        return top, bottom

    @torch.no_grad()
    def decode(self, top: Tensor, bottom: Tensor) -> Tensor:
        """Codes top (B, R/8, R/8) and bottom (B, R/4, R/4) -> images (B, 3, R, R) in [-1, 1]."""
        return self._decode(self.quantizer_top.lookup(top), self.quantizer_bottom.lookup(bottom)).clamp(-1, 1)

    def reconstruct(self, images: Tensor) -> Tensor:
        """decode(*encode(images)), (B, 3, R, R) in [-1, 1]."""
        return self.decode(*self.encode(images))
