"""VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning").

A convolutional encoder maps an image x (B, 3, R, R) to z_e (B, D, R / f, R / f), f = 2 ** downsample
(64 px -> an 8x8 grid by default); each vector is replaced by its nearest codebook entry e (vq.py)
and the decoder maps the grid z_q back to x_hat. Per image, summed over pixels and grid positions:

    L(x) = recon(x, x_hat) + ||sg[z_e] - e||^2 + beta * ||z_e - sg[e]||^2,

recon = ||x - x_hat||^2 ("mse": the paper's -log p(x|z_q) for a Gaussian of variance 1/2, less its
constant) or ||x - x_hat||_1 ("laplace": b = 1). By default the codebook follows EMA updates instead
of its loss term (appendix A.1): they need no learning rate for the codebook, learn it faster, and
are what VQ-VAE-2 uses. The prior over the codes is a separate model that reads encode()'s tokens.

Encoder and decoder follow section 4.1: stride-2 4x4 convolutions, then residual blocks
(ReLU, 3x3 conv, ReLU, 1x1 conv); the decoder mirrors them with transposed convolutions. VQ-VAE-2
(vqvae2.py) builds its two levels from the same pieces.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor, nn

from pipeline.models.reduction import valid_mean
from pipeline.models.vae import psnr
from pipeline.models.vq import VectorQuantizer
from pipeline.ranges import Decay, NonNegativeFloat, NonNegativeInt, PositiveInt, Range

IMAGE_CHANNELS = 3
Width = Annotated[int, Range(2)]  # the stride-2 stages but the last are half as wide


@dataclass
class VQVAEConfig:
    image_size: PositiveInt = 64  # divisible by 2 ** downsample
    channels: Width = 128  # width of the encoder and decoder
    downsample: PositiveInt = 3  # stride-2 stages: the grid side is image_size / 2 ** downsample
    res_blocks: NonNegativeInt = 2
    res_channels: PositiveInt = 32  # inner width of a residual block
    code_dim: PositiveInt = 64  # D
    codebook_size: PositiveInt = 512  # K
    beta: NonNegativeFloat = 0.25  # commitment weight
    ema: bool = True  # EMA codebook updates instead of the codebook loss term
    decay: Decay = 0.99
    dead_code_threshold: NonNegativeFloat = 1.0  # restart codes used less than this per batch on average
    restart: bool = True
    recon: Literal["mse", "laplace"] = "mse"

    def validate(self) -> None:
        if self.image_size % 2 ** self.downsample:
            raise ValueError(f"image_size {self.image_size} is not divisible by 2 ** {self.downsample}")
        if self.recon not in ("mse", "laplace"):
            raise ValueError(f"recon must be 'mse' or 'laplace', got {self.recon!r}")


def make_quantizer(cfg) -> VectorQuantizer:
    """The VQ layer of a VQVAEConfig or VQVAE2Config."""
    return VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.beta, cfg.ema, cfg.decay,
                           dead_code_threshold=cfg.dead_code_threshold, restart=cfg.restart)


def reconstruction_error(x: Tensor, x_hat: Tensor, kind: str) -> Tensor:
    """Squared ("mse") or absolute ("laplace") error, (B, C, H, W) -> (B,) summed over pixels."""
    error = x_hat - x
    if kind == "mse":
        return error.pow(2).flatten(1).sum(1)
    if kind == "laplace":
        return error.abs().flatten(1).sum(1)
    raise ValueError(f"recon must be 'mse' or 'laplace', got {kind!r}")


class ResidualBlock(nn.Module):
    """x + conv1x1(ReLU(conv3x3(ReLU(x))))."""

    def __init__(self, channels: int, res_channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, res_channels, 3, padding=1),
                                   nn.ReLU(), nn.Conv2d(res_channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class Encoder(nn.Module):
    """(B, c_in, H, W) -> (B, channels, H / 2 ** downsample, W / 2 ** downsample): stride-2 4x4
    convolutions (half width but the last), a 3x3 convolution, residual blocks, ReLU."""

    def __init__(self, c_in: int, channels: int, downsample: int, res_blocks: int, res_channels: int) -> None:
        super().__init__()
        widths = [channels // 2] * (downsample - 1) + [channels]
        layers: list[nn.Module] = []
        for c, width in zip([c_in, *widths[:-1]], widths):
            layers += [nn.Conv2d(c, width, 4, 2, 1), nn.ReLU()]
        layers += [nn.Conv2d(channels, channels, 3, padding=1),
                   *[ResidualBlock(channels, res_channels) for _ in range(res_blocks)], nn.ReLU()]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    """(B, c_in, h, w) -> (B, c_out, h * 2 ** upsample, w * 2 ** upsample): a 3x3 convolution,
    residual blocks, ReLU, stride-2 4x4 transposed convolutions (half width), the last to c_out and
    left unbounded, being the mean of p(x|z_q)."""

    def __init__(self, c_in: int, c_out: int, channels: int, upsample: int, res_blocks: int,
                 res_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(c_in, channels, 3, padding=1),
                                   *[ResidualBlock(channels, res_channels) for _ in range(res_blocks)], nn.ReLU()]
        widths = [channels, *[channels // 2] * (upsample - 1), c_out]
        for c, width in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(c, width, 4, 2, 1), nn.ReLU()]
        self.layers = nn.Sequential(*layers[:-1])

    def forward(self, z: Tensor) -> Tensor:
        return self.layers(z)


class VQVAE(nn.Module):
    """The VQ-VAE, with DiscreteVAE's interface (forward, encode, decode, reconstruct)."""

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        blocks = (cfg.res_blocks, cfg.res_channels)
        self.encoder = Encoder(IMAGE_CHANNELS, cfg.channels, cfg.downsample, *blocks)
        self.pre_quantize = nn.Conv2d(cfg.channels, cfg.code_dim, 1)
        self.quantizer = make_quantizer(cfg)
        self.decoder = Decoder(cfg.code_dim, IMAGE_CHANNELS, cfg.channels, cfg.downsample, *blocks)

    @property
    def tokens_per_side(self) -> int:
        return self.cfg.image_size // 2 ** self.cfg.downsample

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """`loss` = mean over valid samples of recon + vq loss, each per image summed over pixels or
        positions. The rest are detached: `recon`, `vq`, `psnr` (dB, [0, 1] images), and
        `perplexity` and `dead_codes` of the valid samples' codes."""
        x, valid = batch["image"], batch["valid"]  # (B, 3, R, R), (B,)
        vq = self.quantizer(self.pre_quantize(self.encoder(x)), valid)  # z_q (B, D, h, w)
        x_hat = self.decoder(vq.z_q)  # (B, 3, R, R)
        recon = reconstruction_error(x, x_hat, self.cfg.recon)  # (B,)
        return {"loss": valid_mean(recon + vq.loss, valid),
                "recon": valid_mean(recon, valid).detach(), "vq": valid_mean(vq.loss, valid).detach(),
                "psnr": psnr(x, x_hat, valid), "perplexity": vq.perplexity, "dead_codes": vq.dead_codes}

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, R, R) in [-1, 1] -> tokens (B, h, w), the nearest codes."""
        return self.quantizer.assign(self.pre_quantize(self.encoder(images)))

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """Tokens (B, h, w) -> images (B, 3, R, R) in [-1, 1]."""
        return self.decoder(self.quantizer.lookup(tokens)).clamp(-1, 1)

    def reconstruct(self, images: Tensor) -> Tensor:
        """decode(encode(images)), (B, 3, R, R) in [-1, 1]."""
        return self.decode(self.encode(images))
