"""The `vqvae2` stage: a two-level VQ-VAE-2 (top codes at 1/8, bottom at 1/4 of the resolution), whose
codes pretokenize writes for the hierarchical PixelCNN priors."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from pipeline.engine.config import TrainConfig
from pipeline.engine.loop import exit_code, train
from pipeline.images import reconstructions
from pipeline.models.vqvae2 import VQVAE2, VQVAE2Config

OUTPUT = "trainer.out_dir"


@dataclass
class Config(TrainConfig):
    model: VQVAE2Config = field(default_factory=VQVAE2Config)


def build_model(cfg: Config) -> nn.Module:
    return VQVAE2(cfg.model)


def run(cfg: Config) -> int:
    return exit_code(train(cfg, build_model, reconstructions))
