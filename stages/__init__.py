"""The stage registry. A stage module defines:

- `Config`: its typed config dataclass;
- `OUTPUT`: the dotted config key that holds its output folder (the runner sets it);
- `run(cfg)`: does the stage's work, leaving its outputs in that folder.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
from pathlib import Path
from types import ModuleType

import safetensors.torch
from torch import nn

from pipeline.config import load_config

STAGES = {
    "shards": "stages.shards",
    "vae": "stages.vae",
    "vqvae": "stages.vqvae",
    "vqvae2": "stages.vqvae2",
    "beta_vae": "stages.beta_vae",
    "cvae": "stages.cvae",
    "dvae": "stages.dvae",
    "gumbel_vae": "stages.gumbel_vae",
    "pixelcnn": "stages.pixelcnn",
    "pretokenize": "stages.pretokenize",
    "dalle": "stages.dalle",
    "sample": "stages.sample",
}


def load_stage(name: str) -> ModuleType:
    """The module of stage `name`, or of an importable module path holding a stage of your own
    (`mypackage.my_stage`); a ValueError naming the nearest stage for a typo."""
    if "." in name:
        try:
            return importlib.import_module(name)
        except ImportError as error:
            raise ValueError(f"cannot import stage module {name!r}: {error}") from None
    if name not in STAGES:
        near = difflib.get_close_matches(name, STAGES, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"unknown stage {name!r}{hint}; stages: {', '.join(sorted(STAGES))}")
    return importlib.import_module(STAGES[name])


def load_trained(run_dir: str | Path, stage: str) -> tuple[nn.Module, object, str]:
    """A finished training run of `stage`: its model (eval mode, built by the stage's build_model
    from the run's config.yaml), that config, and the sha256 of its final weights file."""
    run_dir, module = Path(run_dir), load_stage(stage)
    weights = run_dir / "final" / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{run_dir}: no trained {stage} model (expected {weights})")
    cfg = load_config(module.Config, run_dir / "config.yaml")
    model = module.build_model(cfg)
    model.load_state_dict(safetensors.torch.load_file(weights))
    return model.eval(), cfg, hashlib.sha256(weights.read_bytes()).hexdigest()
