"""The `vae` stage: a Gaussian VAE on the images (captions unused)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.engine.config import TrainConfig
from pipeline.engine.loop import exit_code, train
from pipeline.models.vae import VAE, VAEConfig

OUTPUT = "trainer.out_dir"


@dataclass
class Config(TrainConfig):
    model: VAEConfig = field(default_factory=VAEConfig)


def build_model(cfg: Config) -> nn.Module:
    return VAE(cfg.model)


def draw_images(model: VAE, batch: dict) -> dict[str, torch.Tensor]:
    """Originals above their reconstructions, and 32 samples from the prior."""
    originals = batch["image"][:8]
    return {"reconstructions": torch.cat([originals, model.reconstruct(originals)]),
            "samples": model.sample(32, torch.Generator(originals.device).manual_seed(0))}


def run(cfg: Config) -> int:
    return exit_code(train(cfg, build_model, draw_images))
