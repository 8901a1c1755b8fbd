"""The `dvae` stage: DALL-E's discrete VAE, whose argmax codes are the image tokens of later stages."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from pipeline.engine.config import TrainConfig
from pipeline.engine.loop import exit_code, train
from pipeline.images import reconstructions
from pipeline.models.dvae import DiscreteVAE, DVAEConfig

OUTPUT = "trainer.out_dir"


@dataclass
class Config(TrainConfig):
    model: DVAEConfig = field(default_factory=DVAEConfig)


def build_model(cfg: Config) -> nn.Module:
    return DiscreteVAE(cfg.model)


def run(cfg: Config) -> int:
    return exit_code(train(cfg, build_model, reconstructions))
