"""A pipeline file resolved into stage jobs: dependency order, configs, output folders, hashes, and
what to do with each stage's folder.

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
before its first stage starts. A job's hash covers what changes its result (`result_view`:
operational keys such as launch resources, worker counts and log periods are left out) and its
inputs' hashes: the same hash means the same computation (with another world size, an operational
setting, the global batch of data.batch_size per rank changes from there on).

The run cache never destroys training. A stage's folder records the result-changing keys and
inputs of the job it holds (`.t2i-run.json`). Against the job about to run, the folder is:
- resumed when the hash is the same (only operational keys changed, or nothing);
- continued when only extendable keys (`trainer.max_steps`) changed, upwards of its last checkpoint;
- kept as STAGE.old-N, and the stage run again, when only its inputs changed;
- refused, before any stage runs, when one of its own result-changing keys changed: the message
  names the keys (old -> new) and the two ways on, `--from STAGE` or the old values.
`--from STAGE` starts STAGE and its dependents again, keeping their folders as STAGE.old-N, or
deleting them with `--discard`. Nothing else deletes a stage's folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from pipeline.config import (
    MISSING,
    ConfigError,
    changed_keys,
    config_hash,
    extendable_keys,
    load_config,
    result_hash,
    result_view,
)
from pipeline.engine.checkpoint import finished_step, latest, step_of
from pipeline.files import write_json
from pipeline.markers import COMPLETE_MARKER, LEGACY_STARTED_MARKER, RUN_RECORD
from pipeline.owner import FolderBusy, check_free
from pipeline.registry import load_stage


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


class Folder(Enum):
    """What a stage's output folder holds, against the job about to run there."""

    EMPTY = "empty"  # nothing yet
    COMPLETE = "complete"  # this job's finished outputs
    RESUME = "resume"  # this job, unfinished
    EXTEND = "extend"  # this job with a lower extendable key: it continues
    INPUTS_CHANGED = "inputs changed"  # the same stage config over other inputs: kept aside, run again
    CONFLICT = "conflict"  # another result: refused unless started again with --from


class RunConflict(ValueError):
    """Stage folders hold runs that the pipeline's configs no longer describe; nothing was changed."""


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
    inputs: dict[str, str]  # need -> its job's hash
    legacy_hash: str  # the hash of runs recorded before run records existed

    def is_complete(self) -> bool:
        return _read(self.out_dir / COMPLETE_MARKER) == self.hash

    def record(self) -> dict:
        return {"stage": self.stage, "hash": self.hash, "result": result_view(self.cfg), "inputs": self.inputs}

    def assess(self) -> tuple[Folder, str]:
        """The state of the output folder, and for a conflict, why (the changed keys)."""
        out = self.out_dir
        self._adopt_legacy_markers()
        if not out.exists() or not any(out.iterdir()):
            return Folder.EMPTY, ""
        if self.is_complete():
            return Folder.COMPLETE, ""
        try:
            record = json.loads((out / RUN_RECORD).read_text())
        except (OSError, ValueError):
            what = "was written by an earlier t2i" if (out / LEGACY_STARTED_MARKER).exists() else "was not written by t2i run"
            return Folder.CONFLICT, f"  it {what}, so which of its keys differ cannot be told"
        if record["hash"] == self.hash:
            return Folder.RESUME, ""
        changed = changed_keys(record["result"], result_view(self.cfg))
        growing = extendable_keys(self.cfg)
        checkpoint, finished = latest(out / "checkpoints"), finished_step(out)
        progress = max(step_of(checkpoint) if checkpoint else 0, finished or 0)
        lowered = [key for key in changed if key in growing and changed[key][1] < progress]
        lines = [f"    {key}: {_show(old)} -> {_show(new)}" for key, (old, new) in changed.items()]
        if any(key not in growing for key in changed) or lowered:
            lines += [f"  {key} cannot go below step {progress}, which the run has reached" for key in lowered]
            return Folder.CONFLICT, "\n".join(lines)
        if changed and finished is not None and checkpoint is None:
            lines.append(f"  the run finished at step {finished} and holds no checkpoint to continue from")
            return Folder.CONFLICT, "\n".join(lines)
        if record["inputs"] != self.inputs:
            return Folder.INPUTS_CHANGED, ", ".join(sorted(key for key in self.inputs
                                                           if record["inputs"].get(key) != self.inputs[key]))
        return Folder.EXTEND, ", ".join(f"{key} {_show(old)} -> {_show(new)}" for key, (old, new) in changed.items())

    def prepare(self, fresh: bool = False, discard: bool = False) -> str:
        """Readies the output folder for this job and says what became of what it held (empty when
        nothing). `fresh` (from --from) starts over: the folder is kept as NAME.old-N, or deleted
        with `discard`. A conflict must have been refused before (`check_folders`); a folder another
        process writes is refused here too (FolderBusy), as it may have started since."""
        check_free(self.out_dir)
        state, detail = self.assess()
        note = ""
        if fresh and state is not Folder.EMPTY:
            note = self._set_aside(discard)
        elif state is Folder.INPUTS_CHANGED:
            note = f"its inputs changed ({detail}); {self._set_aside(discard=False)}"
        elif state is Folder.EXTEND and detail:
            note = f"continues from its last checkpoint ({detail})"
        elif state is Folder.CONFLICT:
            raise RunConflict(f"stage {self.name!r}: {self.out_dir} holds another run:\n{detail}")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / COMPLETE_MARKER).unlink(missing_ok=True)
        write_json(self.out_dir / RUN_RECORD, self.record())
        return note

    def mark_complete(self) -> None:
        (self.out_dir / COMPLETE_MARKER).write_text(self.hash + "\n")

    def _set_aside(self, discard: bool) -> str:
        if discard:
            shutil.rmtree(self.out_dir)
            return f"deleted {self.out_dir} (--discard)"
        number = 1
        while (aside := self.out_dir.with_name(f"{self.out_dir.name}.old-{number}")).exists():
            number += 1
        os.rename(self.out_dir, aside)
        return f"the previous outputs are kept in {aside}"

    def _adopt_legacy_markers(self) -> None:
        """A folder from before run records, of the same config as this job, gets a record."""
        started = _read(self.out_dir / LEGACY_STARTED_MARKER)
        if started is None or started != self.legacy_hash or (self.out_dir / RUN_RECORD).exists():
            return
        write_json(self.out_dir / RUN_RECORD, self.record())
        if _read(self.out_dir / COMPLETE_MARKER) == self.legacy_hash:
            self.mark_complete()
        (self.out_dir / LEGACY_STARTED_MARKER).unlink()


def check_folders(jobs: list[Job], forced: set[str], command: str) -> None:
    """Raises RunConflict, naming every stage to run whose folder another process writes, and every
    stage whose folder holds another result, its changed keys and the ways on, unless the stage is
    `forced` (started again). Changes nothing but the markers
    of folders from an earlier t2i whose config is this job's."""
    problems = []
    for job in jobs:
        if job.name in forced or not job.is_complete():
            try:
                check_free(job.out_dir)
            except FolderBusy as busy:
                problems.append(f"stage {job.name!r}: {busy}")
                continue
        if job.name in forced:
            continue
        state, detail = job.assess()
        if state is not Folder.CONFLICT:
            continue
        checkpoint = latest(job.out_dir / "checkpoints")
        holds = f" It holds committed checkpoints up to step {step_of(checkpoint)}." if checkpoint else ""
        aside = job.out_dir.with_name(f"{job.out_dir.name}.old-N")
        again = (f"start it again: {command} --from {job.name}   (its folder is kept as {aside}; "
                 "--discard deletes it instead)")
        if not (job.out_dir / RUN_RECORD).exists():
            problems.append(f"stage {job.name!r}: {job.out_dir} holds files the runner did not write there:\n{detail}\n"
                            f"  Nothing was changed. Move them away, or {again}.")
            continue
        problems.append(
            f"stage {job.name!r} ({job.out_dir}) was run with other values of keys that change its result:\n"
            f"{detail}\n {holds} Nothing was changed. Either\n    {again}, or\n"
            "    restore the old values to continue it.")
    if problems:
        raise RunConflict("\n".join(problems))


def _show(value: Any) -> str:
    return value if value == MISSING else json.dumps(value)


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
        needs = sorted(entry.needs)
        inputs = {need: jobs[need].hash for need in needs}
        digest = _chain(result_hash(cfg), inputs.values())
        legacy = _chain(config_hash(cfg), (jobs[need].legacy_hash for need in needs))
        jobs[stage_name] = Job(stage_name, entry.stage, config_path, overrides, list(entry.needs), out_dir, cfg,
                               digest, inputs, legacy)
    return name, [jobs[stage_name] for stage_name in order]


def _chain(own: str, inputs) -> str:
    digest = hashlib.sha256(own.encode())
    for value in inputs:
        digest.update(value.encode())
    return digest.hexdigest()


def downstream(jobs: list[Job], start: str) -> set[str]:
    """`start` and every job that depends on it, directly or not."""
    names = {start}
    for job in jobs:  # jobs are in dependency order, so one pass suffices
        if names.intersection(job.needs):
            names.add(job.name)
    return names


def forced_stages(jobs: list[Job], from_stage: str | None, path) -> set[str]:
    """The stages `--from from_stage` starts again: it and its dependents."""
    if from_stage is None:
        return set()
    if from_stage not in {job.name for job in jobs}:
        raise ValueError(f"--from {from_stage!r}: no such stage in {path}")
    return downstream(jobs, from_stage)


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
