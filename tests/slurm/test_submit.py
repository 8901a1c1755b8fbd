"""`t2i submit`, `status` and `cancel` on the real two-node local cluster."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.engine.checkpoint import latest as latest_step
from pipeline.launch.slurm import stage_states

TOY = "tests.engine.toy_stage"
TINY_TRAIN = ("data.resolution=32, data.batch_size=8, data.num_workers=0, trainer.log_every=1, "
              "launch.cpus_per_task=1")


def _t2i(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def _write_pipeline(path: Path, name: str, out_dir: Path, stages: str) -> Path:
    path.write_text(f"name: {json.dumps(name)}\nout_dir: {json.dumps(str(out_dir))}\nstages:\n{stages}")
    return path


def _data_stage(count: int = 48) -> str:
    return ("  data:\n    stage: shards\n"
            f"    overrides: [count={count}, resolution=32, samples_per_shard=16, launch.cpus_per_task=1]\n")


def _toy_stage(name: str, needs: list[str], extra: str = "") -> str:
    return (f"  {name}:\n    stage: {TOY}\n    needs: {json.dumps(needs)}\n"
            f"    overrides: [\"data.shards=${{data}}\", {TINY_TRAIN}{', ' + extra if extra else ''}]\n")


def _submit(pipeline: Path) -> dict[str, str]:
    result = _t2i("submit", str(pipeline))
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(re.findall(r"^(\S+): submitted job (\d+)", result.stdout, re.MULTILINE))


def _wait(jobs: dict[str, str], timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        queued = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(jobs.values())],
                                capture_output=True, text=True).stdout.split()
        if not queued:
            return
        time.sleep(1)
    subprocess.run(["scancel", *jobs.values()])
    pytest.fail(f"jobs {jobs} still queued after {timeout} s")


def _wait_for_steps(out: Path, steps: int, timeout: float = 240) -> None:
    """Waits until the stage training in `out` has logged `steps` steps."""
    deadline = time.time() + timeout
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < steps:
        assert time.time() < deadline, "the stage did not start training"
        time.sleep(0.5)


def _states(run: Path) -> dict[str, str]:
    return {row["stage"]: row["state"] for row in stage_states(run)}


def _times(log: Path) -> tuple[float, float]:
    text = log.read_text()
    return (float(re.search(r"start (\d+\.\d+)", text).group(1)),
            float(re.findall(r"end (\d+\.\d+)", text)[-1]))


def test_the_tiny_demo_runs_as_dependent_jobs(slurm_cluster, tmp_path):
    stages = (_data_stage()
              + "  vae:\n    stage: vae\n    config: configs/vae/tiny.yaml\n    needs: [data]\n"
              "    overrides: [\"data.shards=${data}\", trainer.max_steps=3, data.num_workers=0, model.channels=8,"
              " launch.cpus_per_task=1]\n"
              "  cvae:\n    stage: cvae\n    config: configs/cvae/tiny.yaml\n    needs: [data, vae]\n"
              "    overrides: [\"data.shards=${data}\", trainer.max_steps=3, data.num_workers=0, model.channels=8,"
              " launch.cpus_per_task=1]\n")
    pipeline = _write_pipeline(tmp_path / "demo.yaml", "demo", tmp_path / "runs", stages)
    jobs = _submit(pipeline)
    assert list(jobs) == ["data", "vae", "cvae"]
    _wait(jobs)
    run = tmp_path / "runs" / "demo"
    assert set(_states(run).values()) == {"COMPLETED"}, _t2i("status", str(run)).stdout
    for stage in ("vae", "cvae"):
        assert (run / stage / "final" / "model.safetensors").exists()
    logs = {stage: next((run / stage).glob("slurm-*.out")) for stage in jobs}
    assert _times(logs["vae"])[0] >= _times(logs["data"])[1]  # started only after its input was complete
    assert _times(logs["cvae"])[0] >= max(_times(logs["vae"])[1], _times(logs["data"])[1])
    status = _t2i("status", str(run)).stdout
    assert all(re.search(rf"^{stage}\s+job {jobs[stage]}\s+COMPLETED", status, re.MULTILINE) for stage in jobs)
    again = _t2i("submit", str(pipeline))
    assert again.stdout.count("complete, not submitted") == 3  # nothing is resubmitted


def test_a_two_node_deepspeed_stage(slurm_cluster, tmp_path):
    stages = _data_stage() + _toy_stage("ds", ["data"], "engine.backend=deepspeed, engine.zero_stage=2, "
                                                        "launch.nnodes=2, trainer.max_steps=4")
    pipeline = _write_pipeline(tmp_path / "ds.yaml", "ds", tmp_path / "runs", stages)
    jobs = _submit(pipeline)
    _wait(jobs)
    out = tmp_path / "runs" / "ds" / "ds"
    log = next(out.glob("slurm-*.out")).read_text()
    assert _states(tmp_path / "runs" / "ds")["ds"] == "COMPLETED", log
    assert "node node1 (node rank 0 of 2)" in log and "node node2 (node rank 1 of 2)" in log
    assert (out / "final" / "model.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*/rank-*.pt")) == ["rank-0.pt", "rank-1.pt"]


@pytest.mark.parametrize("workers", [0, 2])  # requeue's SIGTERM reaches the loader workers too
def test_a_requeued_stage_resumes_from_its_checkpoint_without_training_a_step_twice(slurm_cluster, tmp_path, workers):
    stages = _data_stage() + _toy_stage("toy", ["data"], "trainer.max_steps=24, trainer.save_every=1000, "
                                                         f"model.sleep_s=0.4, data.num_workers={workers}")
    pipeline = _write_pipeline(tmp_path / "rq.yaml", "rq", tmp_path / "runs", stages)
    jobs = _submit(pipeline)
    out = tmp_path / "runs" / "rq" / "toy"
    _wait_for_steps(out, 5)
    subprocess.run(["scontrol", "requeue", jobs["toy"]], check=True)
    _wait(jobs, timeout=400)
    log = next(out.glob("slurm-*.out")).read_text()
    assert _states(tmp_path / "runs" / "rq")["toy"] == "COMPLETED", log
    assert "resumed from" in log and "restart 1" in log
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))  # each step once: the checkpoint was taken where the job stopped
    assert json.loads((out / "final" / "metrics.json").read_text())["step"] == 24


def test_a_requeued_stage_that_cannot_resume_fails_once_and_status_says_why(slurm_cluster, tmp_path):
    stages = _data_stage() + _toy_stage("toy", ["data"], "trainer.max_steps=40, trainer.save_every=1000, "
                                                         "model.sleep_s=0.3, model.crash_on_resume=true")
    pipeline = _write_pipeline(tmp_path / "crash.yaml", "crash", tmp_path / "runs", stages)
    jobs = _submit(pipeline)
    out = tmp_path / "runs" / "crash" / "toy"
    _wait_for_steps(out, 3)
    subprocess.run(["scontrol", "requeue", jobs["toy"]], check=True)
    _wait(jobs, timeout=300)  # before: requeued again and again, until cancelled
    log = (out / f"slurm-{jobs['toy']}.out").read_text()
    assert "restart 1" in log and "restart 2" not in log and "requeueing job" not in log, log
    run = tmp_path / "runs" / "crash"
    assert _states(run)["toy"] == "FAILED"
    status = _t2i("status", str(run)).stdout
    assert "attempts: restart 1: failed (exit 1)" in status, status  # SLURM's requeue killed attempt 0's script
    assert "last error: RuntimeError: toy stage: model.crash_on_resume is set" in status, status


def test_a_stage_requeues_itself_at_most_launch_max_restarts_times(slurm_cluster, tmp_path):
    stages = _data_stage() + _toy_stage("toy", ["data"], "trainer.max_steps=40, trainer.save_every=1000, "
                                                         "model.sleep_s=0.3, launch.max_restarts=0")
    pipeline = _write_pipeline(tmp_path / "cap.yaml", "cap", tmp_path / "runs", stages)
    jobs = _submit(pipeline)
    out = tmp_path / "runs" / "cap" / "toy"
    _wait_for_steps(out, 3)
    subprocess.run(["scancel", "--batch", "--signal=USR1", jobs["toy"]], check=True)
    _wait(jobs, timeout=300)
    run = tmp_path / "runs" / "cap"
    assert _states(run)["toy"] == "FAILED" and latest_step(out / "checkpoints") is not None  # checkpointed, then stopped
    status = _t2i("status", str(run)).stdout
    assert "restart 0: checkpointed, not requeued: launch.max_restarts=0 reached" in status, status


def test_a_local_run_is_refused_while_a_job_trains_the_stage_naming_the_job(slurm_cluster, tmp_path):
    stages = _data_stage() + _toy_stage("toy", ["data"], "trainer.max_steps=60, model.sleep_s=0.3")
    pipeline = _write_pipeline(tmp_path / "owned.yaml", "owned", tmp_path / "runs", stages)
    jobs = _submit(pipeline)
    out = tmp_path / "runs" / "owned" / "toy"
    _wait_for_steps(out, 1)
    local = _t2i("run", str(pipeline))
    subprocess.run(["scancel", *jobs.values()], check=True)
    _wait(jobs)
    # Before: the local run trained the same folder as the job.
    assert local.returncode == 2 and f"SLURM job {jobs['toy']}" in local.stderr, local.stderr
    assert "stage 'toy'" in local.stderr


def test_when_sbatch_refuses_a_stage_the_jobs_queued_before_it_are_cancelled(slurm_cluster, tmp_path):
    stages = _data_stage() + _toy_stage("toy", ["data"], "trainer.max_steps=2, launch.partition=nosuchpartition")
    pipeline = _write_pipeline(tmp_path / "refused.yaml", "refused", tmp_path / "runs", stages)
    result = _t2i("submit", str(pipeline))
    # Before: a traceback, and the data job left queued.
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "sbatch refused stage 'toy'" in result.stderr and "invalid partition" in result.stderr.lower()
    data_job = re.search(r"^data: submitted job (\d+)", result.stdout, re.MULTILINE).group(1)
    assert f"Cancelled the jobs this submission had queued before it: data (job {data_job})" in result.stderr
    _wait({"data": data_job}, timeout=60)
    assert not (tmp_path / "runs" / "refused" / "slurm" / "jobs.json").exists()
    fixed = _write_pipeline(tmp_path / "refused.yaml", "refused", tmp_path / "runs",
                            _data_stage() + _toy_stage("toy", ["data"], "trainer.max_steps=2"))
    jobs = _submit(fixed)  # nothing of the refused submission stands in the way
    _wait(jobs)
    assert set(_states(tmp_path / "runs" / "refused").values()) == {"COMPLETED"}


def test_a_failing_stage_stops_its_dependents_and_status_says_why(slurm_cluster, tmp_path):
    stages = (_data_stage()
              + _toy_stage("bad", ["data"], "model.nan_at_call=1, model.nan_on_rank=0, trainer.max_nonfinite_skips=1")
              + _toy_stage("after", ["bad", "data"], "trainer.max_steps=2"))
    pipeline = _write_pipeline(tmp_path / "fail.yaml", "fail", tmp_path / "runs", stages)
    jobs = _submit(pipeline)
    _wait(jobs)
    run = tmp_path / "runs" / "fail"
    states = _states(run)
    assert states["data"] == "COMPLETED" and states["bad"] == "FAILED"
    assert states["after"].endswith("(dependency failed: bad)")
    assert not list((run / "after").glob("slurm-*.out"))  # it never ran
    status = _t2i("status", str(run)).stdout
    assert "dependency failed: bad" in status and "NonFiniteLoss" in next((run / "bad").glob("slurm-*.out")).read_text()


def test_names_and_paths_with_spaces_and_shell_syntax_are_data(slurm_cluster, tmp_path):
    name = "it's a $(touch t2i-canary) run; `touch t2i-canary2` & more"  # jobs run in the repository root
    out_dir = tmp_path / "my runs $(touch t2i-canary3)"
    stages = _data_stage(16) + _toy_stage("toy", ["data"], "trainer.max_steps=2")
    pipeline = _write_pipeline(tmp_path / "quote.yaml", name, out_dir, stages)
    jobs = _submit(pipeline)
    _wait(jobs)
    run = out_dir / name
    assert set(_states(run).values()) == {"COMPLETED"}
    assert (run / "toy" / "final" / "model.safetensors").exists()
    assert not list(Path.cwd().glob("t2i-canary*")) and not list(tmp_path.glob("**/t2i-canary*"))


def test_dry_run_is_stable_and_submits_nothing(slurm_cluster, tmp_path):
    stages = _data_stage() + _toy_stage("toy", ["data"], "launch.nnodes=2, launch.partition=debug, "
                                                         '"launch.sbatch_extra=[--comment=t2i test]"')
    pipeline = _write_pipeline(tmp_path / "dry.yaml", "dry", tmp_path / "runs", stages)
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    first, second = _t2i("submit", str(pipeline), "--dry-run"), _t2i("submit", str(pipeline), "--dry-run")
    assert first.returncode == 0 and first.stdout == second.stdout
    assert "#SBATCH --nodes=2" in first.stdout and "#SBATCH --partition=debug" in first.stdout
    assert '#SBATCH --comment="t2i test"' in first.stdout
    assert "--dependency=afterok:<data>" in first.stdout
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before
    assert not (tmp_path / "runs").exists()


def test_the_time_limit_warning_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    # SLURM's --signal=B:USR1@GRACE sends USR1 to the batch shell; `scancel --batch --signal=USR1` does the same now
    stages = _data_stage() + _toy_stage("toy", ["data"], "trainer.max_steps=20, trainer.save_every=1000, "
                                                         "model.sleep_s=0.4")
    pipeline = _write_pipeline(tmp_path / "usr1.yaml", "usr1", tmp_path / "runs", stages)
    jobs = _submit(pipeline)
    out = tmp_path / "runs" / "usr1" / "toy"
    _wait_for_steps(out, 4)
    subprocess.run(["scancel", "--batch", "--signal=USR1", jobs["toy"]], check=True)
    _wait(jobs, timeout=400)
    log = next(out.glob("slurm-*.out")).read_text()
    assert "t2i: USR1: time limit near, checkpointing" in log and "requeueing job" in log
    assert "preempted: checkpoint at step" in log and "resumed from" in log
    assert _states(tmp_path / "runs" / "usr1")["toy"] == "COMPLETED", log
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))


def test_resubmitting_with_more_time_and_steps_continues_and_a_changed_result_is_refused(slurm_cluster, tmp_path):
    def pipeline(extra: str) -> Path:
        stages = (_data_stage(32) + _toy_stage("toy", ["data"], f"trainer.save_every=2, {extra}")
                  + _toy_stage("after", ["toy", "data"], "trainer.max_steps=2"))
        return _write_pipeline(tmp_path / "again.yaml", "again", tmp_path / "runs", stages)

    _wait(_submit(pipeline("trainer.max_steps=4")))
    run = tmp_path / "runs" / "again"
    assert set(_states(run).values()) == {"COMPLETED"}
    # The stage hit its time limit, say: more time (operational) and more steps (it continues).
    jobs = _submit(pipeline("trainer.max_steps=6, launch.time='02:00:00'"))
    assert list(jobs) == ["toy", "after"]  # data is complete
    _wait(jobs)
    assert set(_states(run).values()) == {"COMPLETED"}
    log = sorted((run / "toy").glob("slurm-*.out"))[-1].read_text()
    assert f"resumed from {run.resolve() / 'toy' / 'checkpoints' / 'step-00000004'} (step 4)" in log
    steps = [json.loads(line)["step"] for line in (run / "toy" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
    assert (run / "after.old-1" / "final" / "model.safetensors").exists()  # trained on the 4-step model: kept
    refused = _t2i("submit", str(pipeline("trainer.max_steps=6, trainer.seed=5")))
    assert refused.returncode == 2 and "trainer.seed: 0 -> 5" in refused.stderr and "--from toy" in refused.stderr


def test_submitting_again_while_the_stages_jobs_are_queued_or_running_is_refused(slurm_cluster, tmp_path):
    stages = _data_stage() + _toy_stage("toy", ["data"], "trainer.max_steps=30, model.sleep_s=0.3")
    pipeline = _write_pipeline(tmp_path / "busy.yaml", "busy", tmp_path / "runs", stages)
    jobs = _submit(pipeline)
    again = _t2i("submit", str(pipeline))
    subprocess.run(["scancel", *jobs.values()], check=True)
    _wait(jobs)
    assert again.returncode == 2 and "still queued or running from an earlier submission" in again.stderr
    assert f"toy (job {jobs['toy']}," in again.stderr and "submitted job" not in again.stdout


def test_the_last_error_of_a_log_passes_over_torchruns_child_failed_error(tmp_path):
    from pipeline.launch.slurm import failure_cause

    log = tmp_path / "slurm-1.out"
    child_failed = ("Traceback (most recent call last):\n  File \"run.py\", line 1\n"
                    "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n====\npipeline.cli FAILED\n")
    log.write_text("t2i: job 1 start\n[rank1]: Traceback (most recent call last):\nTraceback (most recent call last):\n"
                   "  File \"loop.py\", line 3\nRuntimeError: rank 1 ran out of memory\n" + child_failed)
    assert failure_cause(log) == "RuntimeError: rank 1 ran out of memory"
    log.write_text("t2i: config error: command line: key 'optim.lr' must be > 0, got 0\n" + child_failed)
    assert failure_cause(log) == "config error: command line: key 'optim.lr' must be > 0, got 0"
    assert failure_cause(tmp_path / "absent.out") == ""
