"""A pipeline file resolved into stage jobs: dependency order, configs, output folders, hashes.

A pipeline YAML:

    name: demo                       # optional; defaults to the file's stem
    out_dir: runs                    # outputs go to OUT_DIR/NAME/STAGE
    stages:
      shapes: {stage: shards, config: configs/shards/shapes-demo.yaml}
      vae:
        stage: vae
        config: configs/vae/tiny.yaml
        needs: [shapes]
        overrides: ["data.shards=${shapes}"]   # ${STAGE} is that stage's output folder

Every stage's config is loaded and validated here, so a bad key anywhere stops the pipeline
before its first stage starts. A job's hash covers its resolved config and its inputs' hashes:
the same hash means the same outputs.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, config_hash, load_config
from stages import load_stage

COMPLETE_MARKER = ".t2i-complete"  # holds the hash of the finished job
STARTED_MARKER = ".t2i-started"  # holds the hash of the job whose outputs the folder holds


@dataclass
class StageEntry:
    stage: str
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)


@dataclass
class PipelineFile:
    stages: dict[str, StageEntry]
    name: str = ""
    out_dir: str = "runs"

    def validate(self) -> None:
        for name in (self.name, *self.stages):
            if "/" in name or name in (".", ".."):
                raise ValueError(f"pipeline and stage names become folder names: {name!r} cannot be one")


@dataclass
class Job:
    """One stage of a pipeline, ready to run."""

    name: str
    stage: str
    config_path: str | None
    overrides: list[str]  # interpolated, with the output folder set
    needs: list[str]
    out_dir: Path
    cfg: Any
    hash: str

    def is_complete(self) -> bool:
        return _read(self.out_dir / COMPLETE_MARKER) == self.hash

    def prepare(self, fresh: bool) -> None:
        """Readies the output folder: an unfinished run of the same hash is kept, to be resumed;
        one of another hash (or any, when `fresh`) is deleted first."""
        if self.out_dir.exists() and (fresh or _read(self.out_dir / STARTED_MARKER) != self.hash):
            shutil.rmtree(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / COMPLETE_MARKER).unlink(missing_ok=True)
        (self.out_dir / STARTED_MARKER).write_text(self.hash + "\n")

    def mark_complete(self) -> None:
        (self.out_dir / COMPLETE_MARKER).write_text(self.hash + "\n")


def _read(path: Path) -> str | None:
    return path.read_text().strip() if path.exists() else None


def load_pipeline(path: str | os.PathLike, extra_overrides: dict[str, list[str]] | None = None) -> tuple[str, list[Job]]:
    """The pipeline's name and its jobs in dependency order (file order among independent stages)."""
    spec = load_config(PipelineFile, path)
    name = spec.name or Path(path).stem
    root = Path(spec.out_dir) / name
    order = _dependency_order(spec, path)
    jobs: dict[str, Job] = {}
    for stage_name in order:
        entry = spec.stages[stage_name]
        module = _stage_module(entry.stage, stage_name, path)
        out_dir = root / stage_name
        overrides = [_interpolate(item, entry.needs, root, stage_name, path) for item in entry.overrides]
        overrides += (extra_overrides or {}).get(stage_name, [])
        overrides.append(f"{module.OUTPUT}={out_dir}")
        config_path = _find_config(entry.config, path, stage_name)
        cfg = load_config(module.Config, config_path, overrides)
        digest = hashlib.sha256(config_hash(cfg).encode())
        for need in sorted(entry.needs):
            digest.update(jobs[need].hash.encode())
        jobs[stage_name] = Job(stage_name, entry.stage, config_path, overrides, list(entry.needs), out_dir, cfg,
                               digest.hexdigest())
    return name, [jobs[stage_name] for stage_name in order]


def downstream(jobs: list[Job], start: str) -> set[str]:
    """`start` and every job that depends on it, directly or not."""
    names = {start}
    for job in jobs:  # jobs are in dependency order, so one pass suffices
        if names.intersection(job.needs):
            names.add(job.name)
    return names


def _stage_module(stage: str, name: str, path) -> Any:
    try:
        return load_stage(stage)
    except ValueError as error:
        raise ConfigError(f"{path}: stages.{name}.stage: {error}") from None


def _find_config(config: str | None, pipeline_path, name: str) -> str | None:
    """A stage config path as written, else relative to the pipeline file's folder."""
    if config is None:
        return None
    for candidate in (Path(config), Path(pipeline_path).parent / config):
        if candidate.exists():
            return str(candidate)
    raise ConfigError(f"{pipeline_path}: stages.{name}.config: no such file {config!r}")


def _interpolate(override: str, needs: list[str], root: Path, name: str, path) -> str:
    def output_of(match: re.Match) -> str:
        other = match.group(1)
        if other not in needs:
            raise ConfigError(f"{path}: stages.{name}.overrides: ${{{other}}} refers to a stage not in needs")
        return str(root / other)
    return re.sub(r"\$\{([A-Za-z0-9_\-]+)\}", output_of, override)


def _dependency_order(spec: PipelineFile, path) -> list[str]:
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in visiting:
            raise ConfigError(f"{path}: stages: dependency cycle {' -> '.join(chain + (name,))}")
        visiting.add(name)
        for need in spec.stages[name].needs:
            if need not in spec.stages:
                raise ConfigError(f"{path}: stages.{name}.needs: no stage named {need!r}")
            visit(need, chain + (name,))
        order.append(name)

    for name in spec.stages:
        visit(name, ())
    return order
