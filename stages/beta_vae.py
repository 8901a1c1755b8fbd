"""The `beta_vae` stage: the VAE stage with weight beta on the KL (model.beta; 4 by default)."""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.models.vae import VAEConfig
from stages import vae
from stages.vae import OUTPUT, run  # noqa: F401  (the stage interface)


@dataclass
class Config(vae.Config):
    model: VAEConfig = field(default_factory=lambda: VAEConfig(beta=4.0))
