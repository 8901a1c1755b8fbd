"""The Gaussian diffusion process the diffusion stages train with (Ho et al. 2020, "Denoising
Diffusion Probabilistic Models"), where the papers' choices live; sampling uses diffusers'
schedulers built from the same betas (`pipeline/models/diffusion_sampling.py`).

A clean sample x0 is noised at step t in [0, T) as

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I),   abar_t = prod_{s<=t} (1 - beta_s),

its signal-to-noise ratio SNR(t) = abar_t / (1 - abar_t). The network predicts one of
- epsilon: eps;
- v_prediction: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022);
- sample: x0,
and each converts to the others given x_t. Betas follow a schedule: `linear` (DDPM, 1e-4 to 0.02),
`scaled_linear` (latent diffusion: linear in sqrt(beta), 0.00085 to 0.012) or `cosine` (Nichol &
Dhariwal 2021, betas capped at 0.999). `zero_terminal_snr` rescales them so that abar at the last
step is exactly 0 (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
Flawed"), which needs v or x0 prediction. The loss is the mean squared error to the target, per
sample, weighted `plain` or by min-SNR-gamma (Hang et al. 2023): the x0-space weight min(SNR, gamma)
expressed for the target predicted, that is min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) /
(SNR + 1) for v and min(SNR, gamma) for x0. A `noise_offset` adds a per-sample, per-channel
constant to the noise (Guttenberg 2023), which lets a model learn images much darker or lighter
than the mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from pipeline.models.reduction import valid_mean
from pipeline.ranges import NonNegativeFloat, PositiveFloat, PositiveInt

Prediction = Literal["epsilon", "v_prediction", "sample"]  # diffusers' names for the three targets


@dataclass
class DiffusionConfig:
    schedule: Literal["linear", "scaled_linear", "cosine"] = "scaled_linear"
    steps: PositiveInt = 1000  # T
    beta_start: PositiveFloat = 0.00085  # linear and scaled_linear
    beta_end: PositiveFloat = 0.012
    prediction: Prediction = "epsilon"
    zero_terminal_snr: bool = False
    loss_weighting: Literal["plain", "min_snr"] = "plain"
    min_snr_gamma: PositiveFloat = 5.0
    noise_offset: NonNegativeFloat = 0.0  # e.g. 0.05; 0 turns it off

    def validate(self) -> None:
        if self.schedule != "cosine" and not self.beta_start < self.beta_end < 1:
            raise ValueError(f"betas must grow below 1: beta_start {self.beta_start}, beta_end {self.beta_end}")
        if self.zero_terminal_snr and self.prediction == "epsilon":
            raise ValueError("zero_terminal_snr needs prediction 'v_prediction' or 'sample': "
                             "at SNR 0 the noise says nothing of the image")


def betas_for(cfg: DiffusionConfig) -> Tensor:
    """The T betas of the config's schedule, float64, rescaled to zero terminal SNR when asked."""
    t = cfg.steps
    if cfg.schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, t, dtype=torch.float64)
    elif cfg.schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, t, dtype=torch.float64) ** 2
    else:
        def abar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - abar((i + 1) / t) / abar(i / t), 0.999) for i in range(t)], dtype=torch.float64)
    return _rescaled_to_zero_terminal_snr(betas) if cfg.zero_terminal_snr else betas


def _rescaled_to_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al., algorithm 1: sqrt(abar) shifted and scaled so its last value is 0 and its first unchanged."""
    root = torch.cumprod(1 - betas, 0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    abar = root ** 2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


class NoiseSchedule(nn.Module):
    """Noising, targets, conversions and loss weights of one diffusion process; its one buffer,
    abar_t (T,), moves with the module to a device."""

    def __init__(self, cfg: DiffusionConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas_for(cfg), 0).float(), persistent=False)

    def _coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """sqrt(abar_t) and sqrt(1 - abar_t) per sample, shaped to broadcast over `like`, in fp32:
        in bf16 the low noise levels round (sigma at t = 1 would be 0)."""
        abar = self.alphas_cumprod[t].float().view(-1, *([1] * (like.dim() - 1)))
        return abar.sqrt(), (1 - abar).sqrt()

    def sample_timesteps(self, batch: int, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
        """Steps drawn uniformly from [0, T), (batch,) int64."""
        return torch.randint(0, self.cfg.steps, (batch,), device=device, generator=generator)

    def sample_noise(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """eps ~ N(0, I) shaped like x0 (B, C, ...), plus noise_offset * N(0, 1) per sample and channel."""
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        if self.cfg.noise_offset:
            offset = torch.randn((*x0.shape[:2], *([1] * (x0.dim() - 2))), device=x0.device, dtype=x0.dtype,
                                 generator=generator)
            noise = noise + self.cfg.noise_offset * offset
        return noise

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        signal, sigma = self._coefficients(t, x0)
        return (signal * x0 + sigma * noise).to(x0.dtype)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network learns to predict from x_t: noise, v (in fp32) or x0 (the config's `prediction`)."""
        if self.cfg.prediction == "epsilon":
            return noise
        if self.cfg.prediction == "sample":
            return x0
        signal, sigma = self._coefficients(t, x0)
        return signal * noise - sigma * x0

    def predicted_x0(self, prediction: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x0 implied by a network output at x_t (undefined for epsilon at abar_t = 0)."""
        signal, sigma = self._coefficients(t, x_t)
        if self.cfg.prediction == "epsilon":
            return ((x_t - sigma * prediction) / signal).to(x_t.dtype)
        if self.cfg.prediction == "sample":
            return prediction
        return (signal * x_t - sigma * prediction).to(x_t.dtype)

    def predicted_noise(self, prediction: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """eps implied by a network output at x_t (undefined for x0 prediction at abar_t = 1)."""
        signal, sigma = self._coefficients(t, x_t)
        if self.cfg.prediction == "epsilon":
            return prediction
        if self.cfg.prediction == "sample":
            return ((x_t - signal * prediction) / sigma).to(x_t.dtype)
        return (sigma * x_t + signal * prediction).to(x_t.dtype)

    def snr(self, t: Tensor) -> Tensor:
        abar = self.alphas_cumprod[t]
        return abar / (1 - abar)

    def loss_weight(self, t: Tensor) -> Tensor:
        """Per-sample weights (B,) of the squared error to the target: 1, or min-SNR-gamma's."""
        if self.cfg.loss_weighting == "plain":
            return torch.ones(t.shape, device=self.alphas_cumprod.device)
        snr = self.snr(t)
        clipped = snr.clamp(max=self.cfg.min_snr_gamma)
        if self.cfg.prediction == "epsilon":
            return clipped / snr
        if self.cfg.prediction == "v_prediction":
            return clipped / (snr + 1)
        return clipped

    def loss(self, prediction: Tensor, x0: Tensor, noise: Tensor, t: Tensor, valid: Tensor) -> Tensor:
        """The weighted mean squared error to the target: per sample a mean over its elements, then
        a mean over the valid samples (padding in a batch counts for nothing)."""
        error = (prediction.float() - self.target(x0, noise, t).float()).pow(2).flatten(1).mean(1)
        return valid_mean(error * self.loss_weight(t), valid)
