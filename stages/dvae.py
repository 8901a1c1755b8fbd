"""The `dvae` stage: DALL-E's discrete VAE, whose argmax codes are the image tokens of later stages."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from pipeline.config import load_config
from pipeline.engine.config import TrainConfig
from pipeline.engine.loop import exit_code, train
from pipeline.models.dvae import DiscreteVAE, DVAEConfig

OUTPUT = "trainer.out_dir"


@dataclass
class Config(TrainConfig):
    model: DVAEConfig = field(default_factory=DVAEConfig)


def build_model(cfg: Config) -> nn.Module:
    return DiscreteVAE(cfg.model)


def draw_images(model: DiscreteVAE, batch: dict) -> dict[str, torch.Tensor]:
    """Originals above their reconstructions through the argmax tokens."""
    originals = batch["image"][:16]
    return {"reconstructions": torch.cat([originals, model.reconstruct(originals)])}


def run(cfg: Config) -> int:
    return exit_code(train(cfg, build_model, draw_images))


def load_trained(run_dir: str | Path) -> tuple[DiscreteVAE, Config, str]:
    """A finished dvae run's model (eval mode), its config and the sha256 of its weights file."""
    run_dir = Path(run_dir)
    weights = run_dir / "final" / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{run_dir}: no trained dVAE (expected {weights})")
    cfg = load_config(Config, run_dir / "config.yaml")
    model = DiscreteVAE(cfg.model)
    model.load_state_dict(safetensors.torch.load_file(weights))
    return model.eval(), cfg, hashlib.sha256(weights.read_bytes()).hexdigest()
