"""The local pipeline runner: order, skipping complete stages, re-running changed ones, failures,
stages side by side on their own cores."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.launch.dag import load_pipeline
from pipeline.launch.local import chain_lengths, copy_output, core_slots
from tests.conftest import stages_started, t2i_run

two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPU cores")

PIPELINE = """
name: {name}
out_dir: {out}
stages:
  data:
    stage: shards
    overrides: [count=40, resolution=32, samples_per_shard=20]
  first:
    stage: tests.engine.toy_stage
    needs: [data]
    overrides: ["data.shards=${{data}}", data.resolution=32, data.batch_size=8, data.num_workers=0,
                trainer.max_steps={steps}, trainer.log_every=1]
  second:
    stage: tests.engine.toy_stage
    needs: [first, data]
    overrides: ["data.shards=${{data}}", data.resolution=32, data.batch_size=8, data.num_workers=0,
                trainer.max_steps=2]
"""


def _write(tmp_path: Path, steps: int = 3, name: str = "p") -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE.format(name=name, out=tmp_path / "runs", steps=steps))
    return path


def test_the_runner_skips_complete_stages_and_reruns_a_changed_one_and_its_dependents(tmp_path):
    path = _write(tmp_path)
    first = t2i_run(path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert stages_started(first) == ["data", "first", "second"]
    root = tmp_path / "runs" / "p"
    assert (root / "second" / "final" / "model.safetensors").exists()
    report = (root / "report.html").read_text()
    assert all(f"<h2>{stage} " in report for stage in ("data", "first", "second")) and "<svg" in report

    again = t2i_run(path)
    assert stages_started(again) == [] and again.stdout.count("complete, skipped") == 3

    changed = t2i_run(_write(tmp_path, steps=4))
    assert stages_started(changed) == ["first", "second"]  # data's config is unchanged
    assert (root / "first" / "final" / "metrics.json").read_text().count('"step": 4')

    forced = t2i_run(path, "--from", "second")
    assert stages_started(forced) == ["second"]


def test_a_failing_stage_stops_the_run_and_names_its_log(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE.format(name="p", out=tmp_path / "runs", steps=3)
                    .replace("data.num_workers=0,\n                trainer.max_steps=3",
                             "data.num_workers=0,\n                trainer.max_steps=3, model.nan_at_call=1, "
                             "model.nan_on_rank=0, trainer.max_nonfinite_skips=1"))
    result = t2i_run(path)
    log = tmp_path / "runs" / "p" / "first" / "log.txt"
    assert result.returncode != 0 and f"first: FAILED with exit code 1; log: {log}" in result.stderr
    assert "NonFiniteLoss" in log.read_text() and stages_started(result) == ["data", "first"]


def test_a_bad_key_in_any_stage_stops_the_pipeline_before_it_starts(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE.format(name="p", out=tmp_path / "runs", steps=3).replace("trainer.max_steps=2",
                                                                                     "trainer.max_step=2"))
    with pytest.raises(ConfigError, match=r"unknown key 'trainer.max_step' \(did you mean 'trainer.max_steps'\?\)"):
        load_pipeline(path)
    assert t2i_run(path).returncode == 2 and not (tmp_path / "runs").exists()


PROBES = """
name: p
out_dir: {out}
stages:
  side: {{stage: tests.probe_stage}}
  a: {{stage: tests.probe_stage, overrides: [sleep_s=5]}}
  b: {{stage: tests.probe_stage, overrides: [sleep_s=5]}}
  last: {{stage: tests.probe_stage, needs: [a, b]}}
  final: {{stage: tests.probe_stage, needs: [last, side]}}
"""


def _probes(tmp_path: Path, *args: str) -> tuple[dict[str, dict], str]:
    """Each probe's record, and what the runner printed."""
    path = tmp_path / "pipeline.yaml"
    path.write_text(PROBES.format(out=tmp_path / "runs"))
    result = t2i_run(path, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return {stage: json.loads((tmp_path / "runs" / "p" / stage / "probe.json").read_text())
            for stage in ("side", "a", "b", "last", "final")}, result.stdout


@two_cores
def test_with_jobs_independent_stages_run_at_once_on_their_own_cores_critical_path_first(tmp_path):
    cores = sorted(os.sched_getaffinity(0))
    runs, printed = _probes(tmp_path, "--jobs", "2")
    a, b, side, last = runs["a"], runs["b"], runs["side"], runs["last"]
    assert a["start"] < b["end"] and b["start"] < a["end"]  # at the same time
    assert not set(a["cores"]) & set(b["cores"]) and sorted(a["cores"] + b["cores"]) == cores
    # a and b lead to `last`, so both start before `side`, which waits for a free slot
    assert side["start"] >= min(a["end"], b["end"])
    assert last["start"] >= max(a["end"], b["end"])
    # `final` starts alone: every core, and its output on the terminal; a's went to its log only
    assert runs["final"]["cores"] == cores and f"probe final ran on {cores}" in printed and "probe a ran" not in printed
    assert f"probe a ran on {a['cores']}" in (tmp_path / "runs" / "p" / "a" / "log.txt").read_text()


def test_one_job_at_a_time_gets_every_core(tmp_path):
    runs, printed = _probes(tmp_path)
    assert all(f"probe {stage} ran" in printed for stage in runs)
    order = sorted(runs, key=lambda stage: runs[stage]["start"])
    assert order == ["a", "b", "side", "last", "final"]  # the longest chains first
    assert all(record["cores"] == sorted(os.sched_getaffinity(0)) for record in runs.values())
    assert runs["a"]["end"] <= runs["b"]["start"]


def test_the_core_split_and_the_critical_path_order(tmp_path):
    assert core_slots([0, 1, 2, 3, 4], 2) == [frozenset({2, 3, 4}), frozenset({0, 1})]  # the larger first
    assert core_slots([0, 1], 1) == [frozenset({0, 1})]
    with pytest.raises(ValueError, match="--jobs 3: this process may use 2 CPU core"):
        core_slots([0, 1], 3)
    path = tmp_path / "pipeline.yaml"
    path.write_text(PROBES.format(out=tmp_path / "runs"))
    _, jobs = load_pipeline(path)
    assert chain_lengths(jobs) == {"side": 1, "a": 2, "b": 2, "last": 1, "final": 0}


SIDE_BY_SIDE = """
name: p
out_dir: {out}
stages:
  a: {{stage: tests.probe_stage, overrides: [sleep_s={a_sleep}, exit_code={a_exit}]}}
  b: {{stage: tests.probe_stage, overrides: [sleep_s={b_sleep}]}}
  after_b: {{stage: tests.probe_stage, needs: [b]}}
"""


@two_cores
def test_after_a_failure_the_running_stages_finish_and_no_new_one_starts(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(SIDE_BY_SIDE.format(out=tmp_path / "runs", a_sleep=1, a_exit=3, b_sleep=8))
    result = t2i_run(path, "--jobs", "2")
    root = tmp_path / "runs" / "p"
    assert result.returncode == 3 and f"a: FAILED with exit code 3; log: {root / 'a' / 'log.txt'}" in result.stderr
    assert "waiting for the 1 stage(s) still running; no new stage starts" in result.stderr
    assert (root / "b" / "probe.json").exists() and "[p] b: done in" in result.stdout  # let finish
    assert not (root / "after_b").exists()


@two_cores
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_asks_its_running_stages_to_checkpoint_and_waits_for_them(tmp_path, signum):
    path = tmp_path / "pipeline.yaml"
    path.write_text(SIDE_BY_SIDE.format(out=tmp_path / "runs", a_sleep=60, a_exit=0, b_sleep=60))
    runner = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(path), "--jobs", "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    stages = [tmp_path / "runs" / "p" / name for name in ("a", "b")]
    deadline = time.monotonic() + 120
    while not all((stage / "started").exists() for stage in stages):
        assert runner.poll() is None and time.monotonic() < deadline, runner.communicate()
        time.sleep(0.1)
    # A terminal's Ctrl-C goes to the whole foreground process group; SIGTERM to the runner alone.
    os.killpg(runner.pid, signum) if signum == signal.SIGINT else runner.send_signal(signum)
    _, stderr = runner.communicate(timeout=60)
    assert runner.returncode == 130 and "interrupted: stopping b, a" in stderr, stderr
    for stage in stages:  # SIGTERM, the signal training stages checkpoint on, reached both; none was left running
        assert (stage / "terminated").exists() and not (stage / "probe.json").exists()
        assert not Path("/proc", (stage / "started").read_text()).exists()
    assert not (tmp_path / "runs" / "p" / "after_b").exists()


def test_an_output_that_cannot_be_written_is_dropped_and_the_stage_still_runs_to_the_end(tmp_path):
    # Were the pipe left unread, the stage would block once it filled (64 KiB).
    stage = subprocess.Popen([sys.executable, "-c", "print('x' * 999_999)"], stdout=subprocess.PIPE)
    full_disk, log = open("/dev/full", "ab"), open(tmp_path / "log.txt", "ab")
    problems: list[str] = []
    copy_output(stage, [log, full_disk], problems)
    assert stage.wait(timeout=60) == 0 and log.closed
    assert (tmp_path / "log.txt").read_bytes() == b"x" * 999_999 + b"\n"
    assert len(problems) == 1 and problems[0].startswith("/dev/full: ") and "No space left" in problems[0]
