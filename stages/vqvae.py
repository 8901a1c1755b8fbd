"""The `vqvae` stage: a VQ-VAE (nearest-codebook latents on an 8x8 grid at 64 px) whose codes pretokenize writes for the PixelCNN prior."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from pipeline.engine.config import TrainConfig
from pipeline.engine.loop import exit_code, train
from pipeline.images import reconstructions
from pipeline.models.vqvae import VQVAE, VQVAEConfig

OUTPUT = "trainer.out_dir"


@dataclass
class Config(TrainConfig):
    model: VQVAEConfig = field(default_factory=VQVAEConfig)


def build_model(cfg: Config) -> nn.Module:
    return VQVAE(cfg.model)


def run(cfg: Config) -> int:
    return exit_code(train(cfg, build_model, reconstructions))
