"""The stage registry: stage names and the modules that implement them, reached by name so the
library never imports a stage. A stage module defines:

- `Config`: its typed config dataclass;
- `OUTPUT`: the dotted config key that holds its output folder (the runner sets it);
- `run(cfg)`: does the stage's work, leaving its outputs in that folder;
- training stages also `build_model(cfg)`, the model a trained run's weights load into.
"""
from __future__ import annotations

import difflib
import importlib
from types import ModuleType

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
    "kl_autoencoder": "stages.kl_autoencoder",
    "latents": "stages.latents",
    "ldm": "stages.ldm",
    "sample": "stages.sample",
    "score": "stages.score",
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


def output_dir(module: ModuleType, cfg) -> str:
    """The output folder a stage's config names (at its `OUTPUT` key)."""
    value = cfg
    for part in module.OUTPUT.split("."):
        value = getattr(value, part)
    return value
