"""The `gumbel_vae` stage: a VAE with N categorical latents through the Gumbel-softmax (captions unused)."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from pipeline.engine.config import TrainConfig
from pipeline.engine.loop import exit_code, train
from pipeline.images import reconstructions_and_samples
from pipeline.models.gumbel_vae import GumbelVAE, GumbelVAEConfig

OUTPUT = "trainer.out_dir"


@dataclass
class Config(TrainConfig):
    model: GumbelVAEConfig = field(default_factory=GumbelVAEConfig)


def build_model(cfg: Config) -> nn.Module:
    return GumbelVAE(cfg.model)


def run(cfg: Config) -> int:
    return exit_code(train(cfg, build_model, reconstructions_and_samples))
