"""The discrete VAE of DALL-E (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation").

A ResNet encoder maps an image x to logits over K codebook entries at each position of a grid
(256x256 -> 32x32 = 1024 tokens), q(z|x) = softmax(logits); a ResNet decoder maps codes to p(x|z).
The loss is the negative evidence lower bound with beta = kl_weight, per image summed over pixels
and grid positions (section 2.1, appendix A):

    L(x) = -E_q(z|x)[log p(x|z)] + beta * KL(q(z|x) || U(K)),   KL = sum_k q_k log(K q_k),

the prior uniform over the codes and z a Gumbel-softmax relaxation of q at temperature tau; tau is
cosine-annealed from 1 to 1/16 over 150k updates, beta cosine-ramped from 0 to 6.6 over 5k.

p(x|z) is the logit-Laplace distribution (appendix A.3), the law of sigmoid(y), y ~ Laplace(mu, b),
fitted to pixels mapped from [0, 1] into [eps, 1 - eps] (eps = 0.1) so that logit(x) stays finite:

    -log f(x | mu, b) = log(2 b) + |logit(x) - mu| / b + log(x (1 - x)),   x in (0, 1).

The decoder outputs mu and log b per subpixel; its image is unmap(sigmoid(mu)). Nothing is dropped:
this is the exact NLL of the mapped pixels (as a density on [0, 1] pixels it is off by the constant
log(1 - 2 eps) per subpixel), and log(x (1 - x)) depends on the data only.

Encoder and Decoder reproduce the module tree and parameter names of OpenAI's released dVAE (the
`dall_e` package): its state dicts load strictly into `DiscreteVAE.encoder` and `.decoder`.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.engine.task import Task
from pipeline.models.categorical import codebook_usage, cosine_schedule, gumbel_softmax, kl_to_uniform, usage_gap
from pipeline.models.reduction import valid_mean
from pipeline.models.vae import psnr
from pipeline.ranges import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range

IMAGE_CHANNELS = 3


@dataclass
class DVAEConfig:
    image_size: PositiveInt = 256  # divisible by 2 ** (group_count - 1), the downsampling factor
    codebook_size: PositiveInt = 8192  # K, dall_e's vocab_size
    # Width of the first encoder group and the last decoder group; a ResBlock's inner convolutions are a quarter as wide.
    n_hid: Annotated[int, Range(4)] = 256
    n_blk_per_group: PositiveInt = 2
    group_count: PositiveInt = 4  # the width doubles per group; all groups but the last resample by 2
    n_init: PositiveInt = 128  # width of the decoder's 1x1 input convolution
    recon: Literal["logit_laplace", "mse"] = "logit_laplace"
    # Pixels are mapped into [eps, 1 - eps]: 0 puts logit(x) at infinity, 0.5 maps every pixel to one value.
    logit_laplace_eps: Annotated[float, Range(0, 0.5, low_open=True, high_open=True)] = 0.1
    straight_through: bool = False  # hard one-hot forward, relaxed gradient
    temperature_start: PositiveFloat = 1.0
    temperature_end: PositiveFloat = 1.0 / 16
    temperature_steps: NonNegativeInt = 150_000  # cosine anneal length; 0: temperature_end from the start
    kl_weight_start: NonNegativeFloat = 0.0
    kl_weight_end: NonNegativeFloat = 6.6
    kl_weight_steps: NonNegativeInt = 5_000  # cosine ramp length
    # Weight on the batch's code-usage gap log K - H(mean q) (wav2vec 2.0's diversity loss), per
    # position; 0 is the paper's recipe. Short runs collapse onto a few codes without it.
    diversity_weight: NonNegativeFloat = 0.0

    def validate(self) -> None:
        if self.image_size % 2 ** (self.group_count - 1):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2 ** {self.group_count - 1}")
        if self.recon not in ("logit_laplace", "mse"):
            raise ValueError(f"recon must be 'logit_laplace' or 'mse', got {self.recon!r}")


def map_pixels(x: Tensor, eps: float = 0.1) -> Tensor:
    """Images in [0, 1] -> [eps, 1 - eps], the support the logit-Laplace is fitted on."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: Tensor, eps: float = 0.1) -> Tensor:
    """Inverse of map_pixels, clamped to [0, 1]."""
    return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)


def logit_laplace_nll(x: Tensor, mu: Tensor, log_scale: Tensor) -> Tensor:
    """-log f(x | mu, b = exp(log_scale)) elementwise, for x in (0, 1); see the module docstring."""
    return (math.log(2) + log_scale + (torch.logit(x) - mu).abs() * torch.exp(-log_scale)
            + torch.log(x * (1 - x)))


class Conv2d(nn.Module):
    """dall_e's convolution: 'same' padding, weight `w` ~ N(0, 1 / fan_in), bias `b` = 0."""

    def __init__(self, n_in: int, n_out: int, kw: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw ** 2))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.w, self.b, padding=self.w.shape[-1] // 2)


class ResBlock(nn.Module):
    """id_path(x) + res_path(x) / n_layers ** 2, res_path four ReLU-conv pairs of width n_out / 4
    with kernel sizes `kernels`; id_path is a 1x1 convolution when the width changes."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, ...]) -> None:
        super().__init__()
        # Without normalisation layers, the gain keeps the stack close to its identity paths at init.
        self.post_gain = 1 / n_layers ** 2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, *[n_out // 4] * (len(kernels) - 1), n_out]
        layers = []
        for i, kw in enumerate(kernels, 1):
            layers += [(f"relu_{i}", nn.ReLU()), (f"conv_{i}", Conv2d(widths[i - 1], widths[i], kw))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: Tensor) -> Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _blocks(cfg: DVAEConfig, input_conv: Conv2d, widths: list[int], kernels: tuple[int, ...],
            resample: tuple[str, Callable[[], nn.Module]], n_out: int) -> nn.Sequential:
    """dall_e's `blocks`: `input`, then `group_1` ... `group_G` of n_blk_per_group ResBlocks each,
    all but the last followed by `resample`, then `output` (ReLU, 1x1 convolution to n_out)."""
    n_in, n_layers, (name, make_resample) = input_conv.w.shape[0], cfg.group_count * cfg.n_blk_per_group, resample
    layers: list[tuple[str, nn.Module]] = [("input", input_conv)]
    for g, width in enumerate(widths, 1):
        blocks: list[tuple[str, nn.Module]] = []
        for i in range(1, cfg.n_blk_per_group + 1):
            blocks.append((f"block_{i}", ResBlock(n_in, width, n_layers, kernels)))
            n_in = width
        if g < len(widths):
            blocks.append((name, make_resample()))
        layers.append((f"group_{g}", nn.Sequential(OrderedDict(blocks))))
    output = nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(n_in, n_out, 1))]))
    return nn.Sequential(OrderedDict([*layers, ("output", output)]))


class Encoder(nn.Module):
    """dall_e.Encoder: mapped pixels (B, 3, H, W) -> logits (B, K, H / f, W / f), f = 2 ** (groups - 1)."""

    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        widths = [cfg.n_hid * 2 ** g for g in range(cfg.group_count)]
        self.blocks = _blocks(cfg, Conv2d(IMAGE_CHANNELS, cfg.n_hid, 7), widths, (3, 3, 3, 1),
                              ("pool", lambda: nn.MaxPool2d(kernel_size=2)), cfg.codebook_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    """dall_e.Decoder: codes (B, K, h, w), one-hot or relaxed, -> (B, 2 * 3, h * f, w * f), the
    logit-Laplace location mu (channels 0-2) and log-scale (channels 3-5) of every pixel."""

    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        widths = [cfg.n_hid * 2 ** g for g in reversed(range(cfg.group_count))]
        self.blocks = _blocks(cfg, Conv2d(cfg.codebook_size, cfg.n_init, 1), widths, (1, 3, 3, 3),
                              ("upsample", lambda: nn.Upsample(scale_factor=2, mode="nearest")),
                              2 * IMAGE_CHANNELS)

    def forward(self, z: Tensor) -> Tensor:
        return self.blocks(z)


class DiscreteVAE(Task):
    """The dVAE. The tau and beta schedules read the buffer `step`, the optimizer steps taken so
    far, which `after_step` sets (the training task's hook: pipeline/engine/task.py); it travels
    with the state dict, so that a resumed run continues both schedules exactly."""
    step: Tensor  # () long

    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def after_step(self, step: int) -> None:
        self.step.fill_(step)

    @property
    def tokens_per_side(self) -> int:
        return self.cfg.image_size // 2 ** (self.cfg.group_count - 1)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """`loss` = mean over valid samples of recon + kl_weight * kl, each per image summed over
        pixels or positions; recon = "mse" sums (sigmoid(mu) - mapped x)^2, a Gaussian NLL of variance
        1/2 less its constant. The rest are detached: this step's `temperature` and `kl_weight`, `psnr`
        (dB, [0, 1] images), and `perplexity` and `dead_codes` of the valid samples' argmax codes."""
        cfg, valid = self.cfg, batch["valid"]  # (B,)
        step = int(self.step)
        temperature = cosine_schedule(step, cfg.temperature_start, cfg.temperature_end, cfg.temperature_steps)
        kl_weight = cosine_schedule(step, cfg.kl_weight_start, cfg.kl_weight_end, cfg.kl_weight_steps)
        x_mapped = map_pixels((batch["image"] + 1) / 2, cfg.logit_laplace_eps)  # (B, 3, R, R)
        logits = self.encoder(x_mapped)  # (B, K, h, w)
        z = gumbel_softmax(logits, temperature, cfg.straight_through)
        mu, log_scale = self.decoder(z).chunk(2, 1)  # (B, 3, R, R) each
        if cfg.recon == "logit_laplace":
            recon = logit_laplace_nll(x_mapped, mu, log_scale).flatten(1).sum(1)  # (B,)
        else:
            recon = (torch.sigmoid(mu) - x_mapped).pow(2).flatten(1).sum(1)
        # A term of weight 0 is only logged: no backward pass through its softmax over the K codes.
        with torch.set_grad_enabled(torch.is_grad_enabled() and kl_weight > 0):
            kl = kl_to_uniform(logits)  # (B,)
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.diversity_weight > 0):
            diversity = usage_gap(logits, valid) * logits[0, 0].numel()  # per image, over its positions
        x_hat = unmap_pixels(torch.sigmoid(mu.detach()), cfg.logit_laplace_eps) * 2 - 1  # (B, 3, R, R)
        perplexity, dead_codes = codebook_usage(logits.argmax(1), valid, cfg.codebook_size)
        return {"loss": valid_mean(recon + kl_weight * kl, valid) + cfg.diversity_weight * diversity,
                "recon": valid_mean(recon, valid).detach(), "kl": valid_mean(kl, valid).detach(),
                "diversity": diversity.detach(), "temperature": x_mapped.new_tensor(temperature), "kl_weight": x_mapped.new_tensor(kl_weight),
                "psnr": psnr(batch["image"], x_hat, valid), "perplexity": perplexity, "dead_codes": dead_codes}

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, R, R) in [-1, 1] -> tokens (B, h, w), the argmax codes of q(z|x)."""
        return self.encoder(map_pixels((images + 1) / 2, self.cfg.logit_laplace_eps)).argmax(1)

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """Tokens (B, h, w) -> images (B, 3, R, R) in [-1, 1], unmap(sigmoid(mu)) of the one-hot codes."""
        z = F.one_hot(tokens, self.cfg.codebook_size).permute(0, 3, 1, 2).float()  # (B, K, h, w)
        mu = self.decoder(z)[:, :IMAGE_CHANNELS]
        return unmap_pixels(torch.sigmoid(mu), self.cfg.logit_laplace_eps) * 2 - 1

    def reconstruct(self, images: Tensor) -> Tensor:
        """decode(encode(images)), (B, 3, R, R) in [-1, 1]."""
        return self.decode(self.encode(images))
