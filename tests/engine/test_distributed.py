"""Two real processes under torchrun, on CPU with gloo, for both back ends."""
import subprocess
import sys

import pytest
import torch

from pipeline.engine.checkpoint import latest, step_of
from tests.engine.conftest import toy_overrides


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "pipeline.cli", "stage", "tests.engine.toy_stage", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _optimizer_steps(checkpoint, backend: str) -> int:
    if backend == "accelerate":
        state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["phases"]["train"]["optimizer"]["state"]
        return int(state[0]["step"])
    # DeepSpeed's own file; it is not ours to load with weights_only
    model_states = torch.load(checkpoint / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=False)
    return int(model_states["global_steps"])


@pytest.mark.parametrize("backend,extra", [("accelerate", {}), ("deepspeed", {"engine.zero_stage": 2})])
def test_two_processes_train_and_a_nan_on_one_rank_is_skipped_on_both(shapes_shards, tmp_path, backend, extra):
    out = tmp_path / backend
    result = _torchrun(toy_overrides(shapes_shards, out, **{
        "engine.backend": backend, **extra, "trainer.max_steps": 4, "model.nan_on_rank": 1,
        "model.nan_at_call": 3}))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checkpoint = latest(out / "checkpoints")
    assert step_of(checkpoint) == 4 and (out / "final" / "model.safetensors").exists()
    for rank in (0, 1):
        state = torch.load(checkpoint / f"rank-{rank}.pt", weights_only=True)
        assert state["nonfinite"] == 1 and state["step"] == 4
        assert state["loader"]["consumed"] == 5  # five micro-batches read, one of them dropped
    assert _optimizer_steps(checkpoint, backend) == 4  # the dropped one never reached the weights
    if backend == "deepspeed":
        assert sorted(path.name for path in (checkpoint / "deepspeed").glob("zero_pp_rank_*")) == [
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_a_dead_rank_fails_the_run_within_the_collective_timeout(shapes_shards, tmp_path):
    import time

    start = time.monotonic()
    result = _torchrun(toy_overrides(shapes_shards, tmp_path / "hang", **{
        "trainer.max_steps": 50, "engine.timeout_s": 10, "model.hang_on_rank": 1, "model.hang_at_call": 3}))
    assert result.returncode != 0
    assert time.monotonic() - start < 120  # bounded: not a hang
    assert "timed out" in (result.stdout + result.stderr).lower() or "timeout" in (result.stdout + result.stderr).lower()


def _one_process(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "stage", "tests.engine.toy_stage", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("backend,extra", [("accelerate", {}), ("deepspeed", {"engine.zero_stage": 2})])
def test_a_run_moved_from_two_ranks_to_one_resumes_or_says_why_not(shapes_shards, tmp_path, backend, extra):
    out = tmp_path / backend
    common = {"engine.backend": backend, **extra, "trainer.max_steps": 6, "data.batch_size": 4}
    stopped = _torchrun(toy_overrides(shapes_shards, out, **common, **{"model.signal_at_call": 3}))
    assert stopped.returncode != 0 and step_of(latest(out / "checkpoints")) == 3, stopped.stdout[-3000:]
    moved = _one_process(toy_overrides(shapes_shards, out, **common))
    if backend == "deepspeed":  # ZeRO splits the optimizer state per rank: refused, nothing lost
        assert moved.returncode == 2, moved.stdout[-3000:] + moved.stderr[-3000:]
        assert "was written by 2 ranks with ZeRO stage 2" in moved.stderr and "resume it with 2 ranks" in moved.stderr
        assert step_of(latest(out / "checkpoints")) == 3
        return
    assert moved.returncode == 0, moved.stdout[-3000:] + moved.stderr[-3000:]
    assert "(step 3); world size 2 -> 1" in moved.stdout
    assert "re-planned the rest of epoch 0 for world_size 2 -> 1" in moved.stderr
    state = torch.load(latest(out / "checkpoints") / "rank-0.pt", weights_only=True)
    assert state["step"] == 6 and not (latest(out / "checkpoints") / "rank-1.pt").exists()


def test_the_ema_of_a_zero3_run_on_two_ranks_equals_the_ema_of_a_one_process_run(shapes_shards, tmp_path):
    from safetensors.torch import load_file

    # The toy's loss depends on the weights alone, so both runs take the same steps; the EMA of the
    # ZeRO-3 run is kept in per-rank partitions, the one-process run's in a whole copy.
    common = {"model.data_free": True, "trainer.ema_decay": 0.6, "trainer.max_steps": 6, "trainer.save_every": 3,
              "optim.lr": 0.01}
    sharded = _torchrun(toy_overrides(shapes_shards, tmp_path / "zero3", **common, **{
        "engine.backend": "deepspeed", "engine.zero_stage": 3, "model.signal_at_call": 4}))
    assert sharded.returncode != 0 and step_of(latest(tmp_path / "zero3" / "checkpoints")) == 4, sharded.stderr[-3000:]
    resumed = _torchrun(toy_overrides(shapes_shards, tmp_path / "zero3", **common, **{
        "engine.backend": "deepspeed", "engine.zero_stage": 3}))  # the EMA's partitions come back from the checkpoint
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    whole = _one_process(toy_overrides(shapes_shards, tmp_path / "one", **common))
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    ours, reference = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("zero3", "one"))
    assert ours.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-5, atol=1e-6)
    live = load_file(latest(tmp_path / "one" / "checkpoints") / "model.safetensors")
    assert not torch.allclose(live["net.1.weight"], reference["net.1.weight"], atol=1e-4)  # the average lags the weights
    ema = load_file(latest(tmp_path / "zero3" / "checkpoints") / "ema.safetensors")
    assert int(ema["n_averaged"]) == 6
