import json
from pathlib import Path

import pytest
import torch

from pipeline.engine.checkpoint import MARKER, CheckpointDamaged, Checkpointer, committed, latest, step_of
from pipeline.engine.distributed import DistInfo
from pipeline.files import sha256_of

ONE_PROCESS = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _writer(value: int):
    def write(folder: Path) -> None:
        torch.save({"value": value}, folder / "rank-0.pt")
    return write


def test_a_committed_checkpoint_has_its_marker_and_loads(tmp_path):
    checkpoints = Checkpointer(tmp_path, keep=2, dist=ONE_PROCESS)
    folder = checkpoints.save(10, _writer(10))
    assert folder.name == "step-00000010" and (folder / MARKER).exists()
    assert latest(tmp_path) == folder and step_of(folder) == 10
    assert torch.load(folder / "rank-0.pt", weights_only=True) == {"value": 10}


def test_a_save_killed_part_way_leaves_the_previous_checkpoint_and_nothing_under_the_final_name(tmp_path):
    checkpoints = Checkpointer(tmp_path, keep=1, dist=ONE_PROCESS)
    checkpoints.save(10, _writer(10))

    def dies_half_way(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt  # stands for the process being killed here

    with pytest.raises(KeyboardInterrupt):
        checkpoints.save(20, dies_half_way)
    assert not (tmp_path / "step-00000020").exists()
    assert latest(tmp_path).name == "step-00000010"  # keep=1, yet the last good one survives
    assert torch.load(latest(tmp_path) / "rank-0.pt", weights_only=True) == {"value": 10}
    checkpoints.save(30, _writer(30))  # the next save clears the leftover
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step-00000030"]


def test_a_folder_without_its_marker_is_never_resumed(tmp_path):
    Checkpointer(tmp_path, keep=3, dist=ONE_PROCESS).save(5, _writer(5))
    unmarked = tmp_path / "step-00000009"
    unmarked.mkdir()
    assert latest(tmp_path).name == "step-00000005"


def test_retention_keeps_the_newest(tmp_path):
    checkpoints = Checkpointer(tmp_path, keep=2, dist=ONE_PROCESS)
    for step in (1, 2, 3, 4):
        checkpoints.save(step, _writer(step))
    assert [path.name for path in committed(tmp_path)] == ["step-00000003", "step-00000004"]


def test_the_marker_records_every_files_size_and_checksum(tmp_path):
    folder = Checkpointer(tmp_path, keep=2, dist=ONE_PROCESS).save(3, _writer(3))
    recorded = json.loads((folder / MARKER).read_text())
    assert recorded["step"] == 3 and set(recorded["files"]) == {"rank-0.pt"}
    assert recorded["files"]["rank-0.pt"] == {"sha256": sha256_of(folder / "rank-0.pt"),
                                              "size": (folder / "rank-0.pt").stat().st_size}


@pytest.mark.parametrize("damage", ["flipped", "truncated", "empty", "missing"])
def test_a_damaged_checkpoint_is_passed_over_for_the_one_before_it(tmp_path, capsys, damage):
    checkpoints = Checkpointer(tmp_path, keep=3, dist=ONE_PROCESS)
    checkpoints.save(1, _writer(1))
    newest = checkpoints.save(2, _writer(2))
    data = (newest / "rank-0.pt").read_bytes()
    if damage == "missing":
        (newest / "rank-0.pt").unlink()
    else:
        (newest / "rank-0.pt").write_bytes({"flipped": data[:-8] + bytes(8), "truncated": data[:20], "empty": b""}[damage])
    assert checkpoints.newest_intact() == tmp_path / "step-00000001"
    printed = capsys.readouterr().out
    assert f"checkpoint {newest} is damaged (rank-0.pt: " in printed and (tmp_path / "damaged-step-00000002").exists()
    assert latest(tmp_path) == tmp_path / "step-00000001"  # never again in the way


def test_when_every_checkpoint_is_damaged_the_run_stops_with_a_clear_error(tmp_path):
    checkpoints = Checkpointer(tmp_path, keep=3, dist=ONE_PROCESS)
    (checkpoints.save(1, _writer(1)) / "rank-0.pt").write_bytes(b"")
    with pytest.raises(CheckpointDamaged, match="every checkpoint in .* is damaged"):
        checkpoints.newest_intact()


def test_a_checkpoint_from_before_checksums_is_taken_as_it_is(tmp_path):
    folder = Checkpointer(tmp_path, keep=3, dist=ONE_PROCESS).save(4, _writer(4))
    (folder / MARKER).write_text("4\n")
    assert Checkpointer(tmp_path, keep=3, dist=ONE_PROCESS).newest_intact() == folder


def test_a_save_that_runs_out_of_space_part_way_is_removed_and_says_so(tmp_path):
    import errno

    from pipeline.engine.checkpoint import DiskFull

    checkpoints = Checkpointer(tmp_path, keep=2, dist=ONE_PROCESS)
    checkpoints.save(10, _writer(10))

    def fills_the_disk(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"part of a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFull, match="to write checkpoint step 20: .* free, .* takes .*resumes from step-00000010"):
        checkpoints.save(20, fills_the_disk)
    assert [path.name for path in tmp_path.iterdir()] == ["step-00000010"]  # the partial save is gone

    def fails(folder: Path) -> None:
        raise ValueError("not a disk problem")

    with pytest.raises(ValueError, match="not a disk problem"):
        checkpoints.save(30, fails)
    assert [path.name for path in tmp_path.iterdir()] == ["step-00000010"]


def test_a_save_that_cannot_fit_is_refused_before_writing(tmp_path):
    from pipeline.engine.checkpoint import DiskFull

    checkpoints = Checkpointer(tmp_path, keep=2, dist=ONE_PROCESS, expected_bytes=1 << 62)
    with pytest.raises(DiskFull, match="takes about 4294967296.0 GiB"):
        checkpoints.save(10, _writer(10))
    assert not list(tmp_path.iterdir())
