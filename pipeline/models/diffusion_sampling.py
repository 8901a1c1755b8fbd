"""Sampling a trained diffusion model with diffusers' schedulers (DDIM, DPM-Solver++ 2M, Euler),
built from the same betas, prediction type and terminal-SNR choice as the training process
(`pipeline/models/diffusion.py`). The solvers are diffusers'; this module only drives them.

The scheduler settings are Stable Diffusion's (steps_offset 1, no clipping of x0, the last step
to abar_0 rather than 1), so that a model exported to a diffusers pipeline samples the same images;
with zero terminal SNR, timesteps are spaced from the last one ("trailing", Lin et al. 2024), so
that sampling starts from pure noise as training ended.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from torch import Tensor

from pipeline.models.diffusion import DiffusionConfig

SchedulerName = Literal["ddim", "dpm++", "euler"]
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def make_scheduler(cfg: DiffusionConfig, name: SchedulerName):
    """A diffusers scheduler for sampling the process `cfg` describes."""
    common = {"num_train_timesteps": cfg.steps, "beta_start": cfg.beta_start, "beta_end": cfg.beta_end,
              "beta_schedule": _BETA_SCHEDULES[cfg.schedule], "prediction_type": cfg.prediction,
              "rescale_betas_zero_snr": cfg.zero_terminal_snr, "steps_offset": 1,
              "timestep_spacing": "trailing" if cfg.zero_terminal_snr else "leading"}
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False)
    if name == "dpm++":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                           final_sigmas_type="zero" if cfg.zero_terminal_snr else "sigma_min")
    if name == "euler":
        return EulerDiscreteScheduler(**common)
    raise ValueError(f"unknown scheduler {name!r}: one of ddim, dpm++, euler")


def initial_noise(shape: tuple[int, ...], generators: list[torch.Generator], device: torch.device | str) -> Tensor:
    """Noise (B, ...) for B = len(generators): sample i drawn from generator i alone, on the CPU, so
    that a seed gives one image whatever the batch and the device."""
    return torch.stack([torch.randn(shape[1:], generator=g) for g in generators]).to(device)


@torch.no_grad()
def denoise(predict: Callable[[Tensor, Tensor], Tensor], scheduler, noise: Tensor, steps: int) -> Tensor:
    """Runs `scheduler` for `steps` steps from `noise` (unit variance), calling predict(x, t) for the
    network's output at each step (guidance, if any, is inside `predict`); returns the clean sample."""
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        output = predict(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(output, t, x).prev_sample
    return x
