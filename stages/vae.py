"""The `vae` stage: a Gaussian VAE on the images (captions unused)."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from pipeline.engine.config import TrainConfig
from pipeline.engine.loop import exit_code, train
from pipeline.images import reconstructions_and_samples
from pipeline.models.vae import VAE, VAEConfig

OUTPUT = "trainer.out_dir"


@dataclass
class Config(TrainConfig):
    model: VAEConfig = field(default_factory=VAEConfig)


def build_model(cfg: Config) -> nn.Module:
    return VAE(cfg.model)


def run(cfg: Config) -> int:
    return exit_code(train(cfg, build_model, reconstructions_and_samples))
