"""A stage's run folder: its resolved config, written once by the process that runs the stage, and
the one loader of a trained model from a finished run or from one of its checkpoints.

`OUT/config.yaml` opens with `# t2i stage NAME`, so a run folder says which stage made it."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import nn

from pipeline.config import ConfigError, changed_keys, dump_config, extendable_keys, load_config, result_view
from pipeline.files import sha256_of
from pipeline.owner import owned
from pipeline.registry import load_stage, output_dir

CONFIG_FILE = "config.yaml"
_HEADER = re.compile(r"^# t2i stage ([^\s:]+)")


def run_stage(stage: str, cfg: Any) -> int:
    """Runs stage `stage` with its resolved config: rank 0 owns OUT while the stage runs (a second
    writer gets FolderBusy, pipeline/owner.py) and writes OUT/config.yaml (the only writer of it),
    then the stage's `run`. Returns the stage's exit code. An OUT holding a run of another
    stage, or of other values of result-changing keys (raising an extendable one aside), is refused
    before anything is written."""
    module = load_stage(stage)
    out = Path(output_dir(module, cfg))
    if int(os.environ.get("RANK", 0)) != 0:  # rank 0 owns the folder for the whole job
        return module.run(cfg) or 0
    with owned(out):
        _check_earlier_run(out, stage, module, cfg)
        dump_config(cfg, out / CONFIG_FILE, comment=f"t2i stage {stage}: the fully resolved config of this run")
        return module.run(cfg) or 0


def _check_earlier_run(out: Path, stage: str, module, cfg: Any) -> None:
    recorded = run_stage_name(out)
    if recorded is not None and recorded != stage:
        raise ValueError(f"{out} holds a run of stage {recorded!r}: write the {stage!r} stage's outputs to another folder")
    if recorded is None:
        return
    try:
        earlier = load_config(module.Config, out / CONFIG_FILE)
    except ConfigError:  # written by a t2i whose config no longer loads: nothing to compare
        return
    growing = extendable_keys(cfg)
    changed = {key: values for key, values in changed_keys(result_view(earlier), result_view(cfg)).items()
               if key not in growing}
    if changed:
        keys = ", ".join(f"{key} {json.dumps(old)} -> {json.dumps(new)}" for key, (old, new) in changed.items())
        raise ValueError(f"{out} holds a {stage} run of other values of keys that change its result ({keys}): "
                         "restore them to continue it, or write to another folder")


def run_stage_name(run_dir: str | Path) -> str | None:
    """The stage recorded in a run folder's config.yaml, or None when it has none."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        return None
    with open(path) as handle:
        match = _HEADER.match(handle.readline())
    return match.group(1) if match else None


def stage_of(path: str | Path) -> str | None:
    """The stage recorded for a run folder or one of its checkpoint folders (RUN/checkpoints/step-N)."""
    path = Path(path)
    return run_stage_name(path.parent.parent if path.parent.name == "checkpoints" else path)


@dataclass
class TrainedRun:
    model: nn.Module  # in eval mode, on the CPU
    cfg: Any  # the run's resolved config
    stage: str
    folder: Path  # the run folder (for a checkpoint: the run it belongs to)
    weights_sha256: str  # of the weights file the model was loaded from


def load_run(path: str | Path, stage: str | None = None) -> TrainedRun:
    """The model of a finished training run (`RUN/final/model.safetensors`) or of one of its
    checkpoints (`RUN/checkpoints/step-N`), built by its stage from the run's config.yaml. The
    stage comes from config.yaml's header; `stage`, when given, must agree (runs written before
    the header existed need it)."""
    path = Path(path)
    weights, run = path / "final" / "model.safetensors", path
    if not weights.exists() and (path / "model.safetensors").exists():  # a checkpoint folder
        weights, run = path / "model.safetensors", path.parent.parent
    if not weights.exists():
        raise FileNotFoundError(f"{path}: no trained model (expected {path / 'final' / 'model.safetensors'} "
                                "or a checkpoint folder holding model.safetensors)")
    recorded = run_stage_name(run)
    if stage and recorded and stage != recorded:
        raise ValueError(f"{run} was trained by stage {recorded!r}, not {stage!r}")
    stage = stage or recorded
    if not stage:
        raise ValueError(f"{run / CONFIG_FILE} does not say which stage trained it: name the stage")
    module = load_stage(stage)
    cfg = load_config(module.Config, run / CONFIG_FILE)
    model = module.build_model(cfg)
    model.load_state_dict(safetensors.torch.load_file(weights))
    return TrainedRun(model.eval(), cfg, stage, run, sha256_of(weights))

