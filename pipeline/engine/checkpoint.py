"""Atomic, committed, verified checkpoints under `OUT_DIR/checkpoints/`.

A checkpoint is written by all ranks into `.tmp-step-NNNNNNNN/`; once every rank is done, the ranks
hash its files between them and rank 0 writes the `COMMITTED` marker inside it, last, holding the
sha256 and size of every file, and renames the folder to `step-NNNNNNNN/`. So a folder under a
final name is always complete; a save killed part way leaves only a `.tmp-` folder, which the next
save removes before it writes (a leftover on a nearly full disk would make it fail too). A save
that cannot fit (the newest checkpoint's size, or an estimate before the first, against the space
free) is refused before anything is written, and one that fails anyway removes its own `.tmp-`
folder; for lack of space both raise DiskFull, naming the folder, the space free and the space a
checkpoint of the run takes. Resume takes the newest committed folder whose files all match their checksums,
checked before anything in it is loaded (or unpickled): a damaged one is reported by name, renamed
`damaged-step-NNNNNNNN/` and passed over for the one before it. Old checkpoints are deleted only
after a newer one is committed, keeping the newest `keep`.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from pipeline.engine.distributed import DistInfo, all_gather, any_rank, barrier
from pipeline.files import sha256_of
from pipeline.markers import StageError

MARKER = "COMMITTED"
_FINAL = re.compile(r"^step-(\d{8})$")


class CheckpointDamaged(StageError):
    """Every committed checkpoint of a run fails its checksums."""


class DiskFull(StageError):
    """A checkpoint could not be written for lack of space; the ones before it are intact."""


# A write that failed with less than this free after it ran out of space: torch.save and
# safetensors do not always pass ENOSPC on as an OSError ("unexpected pos" from inline_container.cc).
_NEARLY_FULL_BYTES = 16 << 20


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
    def __init__(self, root: Path, keep: int, dist: DistInfo, expected_bytes: int = 0) -> None:
        """`expected_bytes`: about how much a checkpoint takes, until the first one is written."""
        self.root, self.keep, self.dist, self.expected_bytes = Path(root), keep, dist, expected_bytes

    def newest_intact(self) -> Path | None:
        """The newest committed checkpoint whose files match the checksums in its marker (every rank
        agreeing), or None when there is none. A damaged one is reported, renamed damaged-step-N and
        passed over; CheckpointDamaged when every one is damaged. Checkpoints committed before
        markers held checksums are taken as they are."""
        damaged = []
        for checkpoint in reversed(committed(self.root)):
            problems = self._check(checkpoint)
            if not problems:
                if damaged and self.dist.is_main:
                    print(f"resuming from {checkpoint}, the newest checkpoint that is intact", flush=True)
                return checkpoint
            damaged.append(checkpoint)
            if self.dist.is_main:
                aside = checkpoint.with_name(f"damaged-{checkpoint.name}")
                print(f"checkpoint {checkpoint} is damaged ({'; '.join(problems)}): not loaded, kept as {aside}",
                      flush=True)
                os.replace(checkpoint, aside)
            barrier()
        if damaged:
            raise CheckpointDamaged(f"every checkpoint in {self.root} is damaged (kept as damaged-step-N): "
                                    "start the run again in another folder, or delete them to start it here")
        return None

    def _check(self, checkpoint: Path) -> list[str]:
        """What is wrong with a checkpoint's files against its marker, hashed by the ranks in turn."""
        try:
            recorded = json.loads((checkpoint / MARKER).read_text())
        except ValueError:
            recorded = None
        if not isinstance(recorded, dict):  # a marker from before checksums: nothing to check against
            return []
        files = sorted(recorded["files"])
        mine = [f"{name}: {problem}" for name in files[self.dist.rank::self.dist.world_size]
                if (problem := _problem(checkpoint / name, recorded["files"][name]))]
        (bad,) = any_rank(bool(mine))
        return sorted(problem for problems in all_gather(mine) for problem in problems) if bad else []

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Has every rank call `write(folder)`, then commits the folder as checkpoint `step`."""
        temporary = self.root / f".tmp-step-{step:08d}"
        final = self.root / f"step-{step:08d}"
        if self.dist.is_main:
            self._remove_leftovers()
            self.root.mkdir(parents=True, exist_ok=True)
        barrier()
        # Refused before writing when it cannot fit: a rank failing inside a back end's save (DeepSpeed's
        # ends in a barrier) would leave the others waiting in a collective it never reaches.
        free, need = shutil.disk_usage(self.root).free, self._checkpoint_bytes()
        (short,) = any_rank(free < need)
        if short:
            raise self._disk_full(step, free, need)
        if self.dist.is_main:
            temporary.mkdir()
        barrier()
        try:
            write(temporary)
            error = None
        except Exception as failure:  # every rank must learn of it, or the others wait at the barrier
            error = failure
        (failed,) = any_rank(error is not None)
        if failed:
            self._failed(step, temporary, error)
        names = sorted(str(path.relative_to(temporary)) for path in temporary.rglob("*") if path.is_file())
        mine = {name: {"sha256": sha256_of(temporary / name), "size": (temporary / name).stat().st_size}
                for name in names[self.dist.rank::self.dist.world_size]}  # the ranks hash the files in turn
        files = {name: entry for part in all_gather(mine) for name, entry in part.items()}
        if self.dist.is_main:
            _write_synced(temporary / MARKER, json.dumps({"step": step, "files": files}, indent=1))
            if final.exists():  # a checkpoint of the same step from a run that did not get further
                shutil.rmtree(final)
            os.replace(temporary, final)
            _fsync_dir(self.root)
            self._retain(final)
        barrier()
        return final

    def _failed(self, step: int, temporary: Path, error: Exception | None) -> None:
        """Removes a failed save's folder and raises: DiskFull when space ran out, else the error
        (on the ranks where the save did not fail, a StageError saying where it did)."""
        written = sum(path.stat().st_size for path in temporary.rglob("*") if path.is_file()) if temporary.exists() else 0
        free = shutil.disk_usage(self.root).free
        barrier()
        if self.dist.is_main:
            shutil.rmtree(temporary, ignore_errors=True)
        if error is not None and (_no_space(error) or free < _NEARLY_FULL_BYTES):
            raise self._disk_full(step, free, max(self._checkpoint_bytes(), written)) from error
        if error is None:
            raise StageError(f"checkpoint step {step} failed on another rank; its error is in that rank's output")
        raise error

    def _checkpoint_bytes(self) -> int:
        """The size of the newest committed checkpoint, or before the first, `expected_bytes`."""
        last = latest(self.root)
        return sum(path.stat().st_size for path in last.rglob("*") if path.is_file()) if last else self.expected_bytes

    def _disk_full(self, step: int, free: int, need: int) -> DiskFull:
        last = latest(self.root)
        since = f"; it resumes from {last.name}" if last else ""
        return DiskFull(f"no space left on the device of {self.root} to write checkpoint step {step}: {_size(free)} free, "
                        f"a checkpoint of this run takes {'' if last else 'about '}{_size(need)}. Free space there, "
                        f"or lower trainer.keep_checkpoints, then run the same command{since}")

    def _remove_leftovers(self) -> None:
        """Deletes the folders of saves that were killed or failed."""
        if self.root.is_dir():
            for path in self.root.iterdir():
                if path.name.startswith(".tmp-step-"):
                    shutil.rmtree(path, ignore_errors=True)

    def _retain(self, newest: Path) -> None:
        """Deletes committed checkpoints beyond the newest `keep`, and leftovers of killed saves."""
        for old in committed(self.root)[:-self.keep]:
            if old != newest:
                shutil.rmtree(old, ignore_errors=True)
        self._remove_leftovers()


def _no_space(error: BaseException) -> bool:
    """Whether `error`, or one it arose from, is ENOSPC."""
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _size(count: float) -> str:
    if count < 1024:
        return f"{count:.0f} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        count /= 1024
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}"
    raise AssertionError("unreachable")


def _problem(path: Path, recorded: dict) -> str | None:
    """Why a checkpoint file does not match its recorded size and sha256, or None when it does."""
    if not path.is_file():
        return "missing"
    if path.stat().st_size != recorded["size"]:
        return f"{path.stat().st_size} bytes, {recorded['size']} were written"
    if sha256_of(path) != recorded["sha256"]:
        return "its contents changed since it was written (checksum)"
    return None


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
