"""A full disk, on a real (tmpfs) file system: the run says so in one line and loses nothing, and
what a failed or killed save left behind does not stop the next run."""
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.engine.checkpoint import latest, step_of
from tests.engine.conftest import toy_overrides


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs at tmp_path/disk (needs root, as the local SLURM cluster does); unmounted after."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def _resize(disk: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)


def _stage(shards: str, out: Path, **extra) -> subprocess.CompletedProcess:
    # width 2000: about 3 MiB of weights, 9 MiB a checkpoint with AdamW's moments
    args = toy_overrides(shards, out, **{"model.width": 2000, "trainer.save_every": 2, **extra})
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "stage", "tests.engine.toy_stage", *args],
                          capture_output=True, text=True, timeout=300)


def test_a_full_disk_says_so_and_the_run_resumes_once_there_is_room(shapes_shards, small_disk):
    out = small_disk / "run"
    full = _stage(shapes_shards, out, **{"trainer.max_steps": 4})
    # Before: a traceback ending in safetensors' or torch's `inline_container.cc` error.
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr
    assert f"no space left on the device of {out / 'checkpoints'} to write checkpoint step 2" in full.stderr
    assert "a checkpoint of this run takes about 8." in full.stderr
    assert not list((out / "checkpoints").iterdir())  # the failed save removed its own folder
    _resize(small_disk, "64m")
    done = _stage(shapes_shards, out, **{"trainer.max_steps": 4})
    assert done.returncode == 0, done.stderr
    assert step_of(latest(out / "checkpoints")) == 4


def test_a_leftover_of_a_killed_save_does_not_stop_the_next_run(shapes_shards, small_disk):
    _resize(small_disk, "24m")
    out = small_disk / "run"
    leftover = out / "checkpoints" / ".tmp-step-00000007"  # a save killed at another step, on a run that went back
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(bytes(18 << 20))
    done = _stage(shapes_shards, out, **{"trainer.max_steps": 2})
    # Before: the leftover was removed only after a save succeeded, so the first save ran out of space.
    assert done.returncode == 0, done.stderr
    assert not leftover.exists() and step_of(latest(out / "checkpoints")) == 2
