"""Atomic, committed checkpoints under `OUT_DIR/checkpoints/`.

A checkpoint is written by all ranks into `.tmp-step-NNNNNNNN/`; once every rank is done, rank 0
writes the `COMMITTED` marker inside it, last, and renames the folder to `step-NNNNNNNN/`. So a
folder under a final name is always complete; a save killed part way leaves only a `.tmp-` folder,
which the next save removes. Resume takes the newest folder that has the marker. Old checkpoints
are deleted only after a newer one is committed, keeping the newest `keep`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from pipeline.engine.distributed import DistInfo, barrier

MARKER = "COMMITTED"
_FINAL = re.compile(r"^step-(\d{8})$")


def committed(root: Path) -> list[Path]:
    """Committed checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if _FINAL.match(path.name) and (path / MARKER).exists()]
    return sorted(found, key=lambda path: int(_FINAL.match(path.name).group(1)))


def latest(root: Path) -> Path | None:
    """The newest committed checkpoint, or None."""
    found = committed(root)
    return found[-1] if found else None


def step_of(checkpoint: Path) -> int:
    return int(_FINAL.match(checkpoint.name).group(1))


def finished_step(out: Path) -> int | None:
    """The step at which the run in `out` exported its final weights (`final/`), or None when it has not."""
    metrics = Path(out) / "final" / "metrics.json"
    if not (Path(out) / "final" / "model.safetensors").exists():
        return None
    return json.loads(metrics.read_text())["step"] if metrics.exists() else 0


class Checkpointer:
    def __init__(self, root: Path, keep: int, dist: DistInfo) -> None:
        self.root, self.keep, self.dist = Path(root), keep, dist

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Has every rank call `write(folder)`, then commits the folder as checkpoint `step`."""
        temporary = self.root / f".tmp-step-{step:08d}"
        final = self.root / f"step-{step:08d}"
        if self.dist.is_main:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        barrier()
        write(temporary)
        barrier()
        if self.dist.is_main:
            _write_synced(temporary / MARKER, f"{step}\n")
            if final.exists():  # a checkpoint of the same step from a run that did not get further
                shutil.rmtree(final)
            os.replace(temporary, final)
            _fsync_dir(self.root)
            self._retain(final)
        barrier()
        return final

    def _retain(self, newest: Path) -> None:
        """Deletes committed checkpoints beyond the newest `keep`, and leftovers of killed saves."""
        for old in committed(self.root)[:-self.keep]:
            if old != newest:
                shutil.rmtree(old, ignore_errors=True)
        for path in self.root.iterdir():
            if path.name.startswith(".tmp-step-"):
                shutil.rmtree(path, ignore_errors=True)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
