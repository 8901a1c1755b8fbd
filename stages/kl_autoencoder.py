"""The `kl_autoencoder` stage: latent diffusion's KL autoencoder on the images (captions unused)."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from pipeline.engine.config import TrainConfig
from pipeline.engine.loop import exit_code, train
from pipeline.images import reconstructions
from pipeline.models.kl_autoencoder import KLAutoencoder, KLAutoencoderConfig

OUTPUT = "trainer.out_dir"


@dataclass
class Config(TrainConfig):
    model: KLAutoencoderConfig = field(default_factory=KLAutoencoderConfig)


def build_model(cfg: Config) -> nn.Module:
    return KLAutoencoder(cfg.model)


def run(cfg: Config) -> int:
    return exit_code(train(cfg, build_model, reconstructions))
