"""The run cache never destroys training: what a stage's hash covers, resuming across operational
changes, continuing after trainer.max_steps is raised, refusing result-changing changes, and
--from / --discard. Real `t2i run` processes over a tiny training stage interrupted after a checkpoint."""
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline.config import extendable, extendable_keys, load_config, operational, result_hash, result_view
from pipeline.engine.checkpoint import committed, step_of
from pipeline.launch.dag import load_pipeline
from pipeline.registry import load_stage
from pipeline.runs import run_stage
from tests.conftest import stages_started, t2i_run

PIPELINE = """
name: p
out_dir: {out}
stages:
  data:
    stage: shards
    overrides: [count=48, resolution=32, samples_per_shard=16]
  first:
    stage: tests.engine.toy_stage
    needs: [data]
    overrides: ["data.shards=${{data}}", data.resolution=32, data.batch_size=4, trainer.log_every=1,
                trainer.save_every=2, {first}]
  second:
    stage: tests.engine.toy_stage
    needs: [first, data]
    overrides: ["data.shards=${{data}}", data.resolution=32, data.batch_size=8, data.num_workers=0,
                trainer.max_steps=2]
"""


def _pipeline(tmp_path: Path, **first: object) -> Path:
    values = {"trainer.max_steps": 6, "data.num_workers": 0, "trainer.seed": 0, **first}
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE.format(out=tmp_path / "runs", first=", ".join(f"{k}={v}" for k, v in values.items())))
    return path


def _steps(folder: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _checkpoints(folder: Path) -> list[int]:
    return [step_of(path) for path in committed(folder / "checkpoints")]


@dataclass
class _Inner:
    size: int = 3
    workers: int = operational(2)


@dataclass
class _Schema:
    inner: _Inner = field(default_factory=_Inner)
    resources: _Inner = operational(default_factory=_Inner)  # a whole operational section
    steps: int = extendable(10)
    lr: float = 0.1


def test_the_hash_covers_result_changing_keys_only():
    base = load_config(_Schema)
    assert result_view(base) == {"inner.size": 3, "steps": 10, "lr": 0.1}
    assert extendable_keys(base) == {"steps"}
    for neutral in (["inner.workers=8"], ["resources.size=5", "resources.workers=1"]):
        assert result_hash(load_config(_Schema, overrides=neutral)) == result_hash(base)
    for changing in (["inner.size=4"], ["steps=11"], ["lr=0.2"]):
        assert result_hash(load_config(_Schema, overrides=changing)) != result_hash(base)


def test_a_training_stage_config_marks_launch_workers_threads_timeouts_and_periods_operational(tmp_path):
    _, jobs = load_pipeline(_pipeline(tmp_path))
    keys = set(result_view(jobs[1].cfg))
    for neutral in ("launch.time", "launch.nnodes", "data.num_workers", "engine.cpu_threads", "engine.timeout_s",
                    "trainer.log_every", "trainer.save_every", "trainer.image_every", "trainer.keep_checkpoints"):
        assert neutral not in keys
    assert {"trainer.max_steps", "trainer.seed", "optim.lr", "data.batch_size", "model.width"} <= keys


def test_operational_changes_resume_a_stopped_stage_from_its_checkpoint(tmp_path):
    # Preempted after step 3 (SIGUSR1 during its forward pass): checkpoints 2 and 3, then exit 75.
    stopped = t2i_run(_pipeline(tmp_path, **{"model.signal_at_call": 3}))
    first = tmp_path / "runs" / "p" / "first"
    assert stopped.returncode == 75 and _checkpoints(first) == [2, 3], stopped.stdout + stopped.stderr
    # Another worker count, launch resources, log period and no signal: the same run, resumed.
    resumed = t2i_run(_pipeline(tmp_path, **{"data.num_workers": 2, "launch.time": "'48:00:00'", "trainer.log_every": 2}))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert stages_started(resumed) == ["first", "second"]
    log = (first / "log.txt").read_text()
    assert f"resumed from {first / 'checkpoints' / 'step-00000003'} (step 3)" in log
    assert "re-planned the rest of epoch 0 for workers 1 -> 2" in log  # the loader's streams follow the workers
    assert _steps(first) == [1, 2, 3, 4, 6]  # logged every step, then every 2nd: none trained twice
    assert json.loads((first / "final" / "metrics.json").read_text())["step"] == 6


def test_raising_max_steps_continues_a_finished_stage_and_reruns_its_dependents(tmp_path):
    assert t2i_run(_pipeline(tmp_path)).returncode == 0
    root = tmp_path / "runs" / "p"
    longer = t2i_run(_pipeline(tmp_path, **{"trainer.max_steps": 8}))
    assert longer.returncode == 0, longer.stdout + longer.stderr
    assert stages_started(longer) == ["first", "second"]
    assert "first: continues from its last checkpoint (trainer.max_steps 6 -> 8)" in longer.stdout
    assert f"resumed from {root / 'first' / 'checkpoints' / 'step-00000006'} (step 6)" in (root / "first" / "log.txt").read_text()
    assert _steps(root / "first") == list(range(1, 9)) and _checkpoints(root / "first") == [6, 8]
    assert json.loads((root / "first" / "final" / "metrics.json").read_text())["step"] == 8
    # second trained on the 6-step model: its folder is kept aside, never deleted
    assert f"second: its inputs changed (first); the previous outputs are kept in {root / 'second.old-1'}" in longer.stdout
    assert (root / "second.old-1" / "final" / "model.safetensors").exists()
    assert (root / "second" / "final" / "model.safetensors").exists()
    # Lowering it below the last checkpoint cannot be done by continuing: refused.
    lower = t2i_run(_pipeline(tmp_path, **{"trainer.max_steps": 7}))
    assert lower.returncode == 2 and "trainer.max_steps cannot go below step 8, which the run has reached" in lower.stderr


def test_a_changed_result_key_is_refused_before_any_work_and_from_keeps_the_old_folder(tmp_path):
    assert t2i_run(_pipeline(tmp_path, **{"model.signal_at_call": 3})).returncode == 75
    root = tmp_path / "runs" / "p"
    before = sorted(path.name for path in (root / "first").rglob("*"))
    path = _pipeline(tmp_path, **{"trainer.seed": 1, "optim.lr": 0.01})
    refused = t2i_run(path)
    assert refused.returncode == 2 and stages_started(refused) == []
    message = refused.stderr
    assert f"stage 'first' ({root / 'first'}) was run with other values of keys that change its result" in message
    assert "optim.lr: 0.001 -> 0.01" in message and "trainer.seed: 0 -> 1" in message
    assert "committed checkpoints up to step 3" in message and f"t2i run {path} --from first" in message
    assert sorted(path.name for path in (root / "first").rglob("*")) == before  # nothing touched

    again = t2i_run(path, "--from", "first")
    assert again.returncode == 0, again.stdout + again.stderr
    assert stages_started(again) == ["first", "second"]
    assert _checkpoints(root / "first.old-1") == [2, 3]  # the old run, whole
    assert _steps(root / "first") == list(range(1, 7))  # started again from step 1

    discarded = t2i_run(path, "--from", "first", "--discard")
    assert discarded.returncode == 0 and f"deleted {root / 'first'} (--discard)" in discarded.stdout
    assert not (root / "first.old-2").exists() and (root / "first.old-1").exists()


def test_a_folder_not_written_by_the_runner_is_refused(tmp_path):
    path = _pipeline(tmp_path)
    mine = tmp_path / "runs" / "p" / "data"
    mine.mkdir(parents=True)
    (mine / "precious.txt").write_text("a user's file")
    refused = t2i_run(path)
    assert refused.returncode == 2 and "it was not written by t2i run" in refused.stderr
    assert (mine / "precious.txt").read_text() == "a user's file"


def test_submit_refuses_the_same_before_submitting_anything(tmp_path):
    assert t2i_run(_pipeline(tmp_path, **{"model.signal_at_call": 3})).returncode == 75
    path = _pipeline(tmp_path, **{"model.width": 16})
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", str(path), "--dry-run"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "model.width: 8 -> 16" in result.stderr
    assert f"t2i submit {path} --from first" in result.stderr and "#SBATCH" not in result.stdout


def test_a_finished_run_without_checkpoints_cannot_continue_and_is_left_as_it_is(tmp_path):
    assert t2i_run(_pipeline(tmp_path)).returncode == 0
    first = tmp_path / "runs" / "p" / "first"
    shutil.rmtree(first / "checkpoints")  # deleted to save space
    refused = t2i_run(_pipeline(tmp_path, **{"trainer.max_steps": 8}))
    assert refused.returncode == 2 and "the run finished at step 6 and holds no checkpoint to continue from" in refused.stderr
    assert (first / ".t2i-complete").exists()


def test_a_stage_run_by_hand_refuses_a_folder_holding_another_run(tmp_path):
    overrides = [f"data.shards={tmp_path / 'shards'}", "data.resolution=32", "data.num_workers=0",
                 f"trainer.out_dir={tmp_path / 'run'}", "trainer.max_steps=1"]
    assert run_stage("shards", load_config(load_stage("shards").Config, None, [f"out_dir={tmp_path / 'shards'}", "count=8",
                                                                                "resolution=32"])) == 0
    toy = load_stage("tests.engine.toy_stage").Config
    assert run_stage("tests.engine.toy_stage", load_config(toy, None, overrides)) == 0
    config = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"holds a tests.engine.toy_stage run of other values of keys that change its "
                                         r"result \(trainer.seed 0 -> 3\)"):
        run_stage("tests.engine.toy_stage", load_config(toy, None, [*overrides, "trainer.seed=3"]))
    with pytest.raises(ValueError, match="holds a run of stage 'tests.engine.toy_stage': write the 'shards' stage's"):
        run_stage("shards", load_config(load_stage("shards").Config, None, [f"out_dir={tmp_path / 'run'}"]))
    assert (tmp_path / "run" / "config.yaml").read_text() == config  # untouched
    # More steps is no other result: the run continues.
    assert run_stage("tests.engine.toy_stage", load_config(toy, None, [*overrides, "trainer.max_steps=2"])) == 0
