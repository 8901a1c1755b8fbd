"""The local pipeline runner: order, skipping complete stages, re-running changed ones, failures."""
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.launch.dag import load_pipeline

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


def _run(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path), *args],
                          capture_output=True, text=True, timeout=600)


def _ran(result: subprocess.CompletedProcess) -> list[str]:
    return [line.split()[1].rstrip(":") for line in result.stdout.splitlines()
            if line.startswith("[p] ") and line.endswith(".txt") and " log " in line]


def test_the_runner_skips_complete_stages_and_reruns_a_changed_one_and_its_dependents(tmp_path):
    path = _write(tmp_path)
    first = _run(path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert _ran(first) == ["data", "first", "second"]
    root = tmp_path / "runs" / "p"
    assert (root / "second" / "final" / "model.safetensors").exists()
    report = (root / "report.html").read_text()
    assert all(f"<h2>{stage} " in report for stage in ("data", "first", "second")) and "<svg" in report

    again = _run(path)
    assert _ran(again) == [] and again.stdout.count("complete, skipped") == 3

    changed = _run(_write(tmp_path, steps=4))
    assert _ran(changed) == ["first", "second"]  # data's config is unchanged
    assert (root / "first" / "final" / "metrics.json").read_text().count('"step": 4')

    forced = _run(path, "--from", "second")
    assert _ran(forced) == ["second"]


def test_a_failing_stage_stops_the_run_and_names_its_log(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE.format(name="p", out=tmp_path / "runs", steps=3)
                    .replace("data.num_workers=0,\n                trainer.max_steps=3",
                             "data.num_workers=0,\n                trainer.max_steps=3, model.nan_at_call=1, "
                             "model.nan_on_rank=0, trainer.max_nonfinite_skips=1"))
    result = _run(path)
    log = tmp_path / "runs" / "p" / "first" / "log.txt"
    assert result.returncode != 0 and f"first: FAILED with exit code 1; log: {log}" in result.stderr
    assert "NonFiniteLoss" in log.read_text() and _ran(result) == ["data", "first"]


def test_a_bad_key_in_any_stage_stops_the_pipeline_before_it_starts(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE.format(name="p", out=tmp_path / "runs", steps=3).replace("trainer.max_steps=2",
                                                                                     "trainer.max_step=2"))
    with pytest.raises(ConfigError, match=r"unknown key 'trainer.max_step' \(did you mean 'trainer.max_steps'\?\)"):
        load_pipeline(path)
    assert _run(path).returncode == 2 and not (tmp_path / "runs").exists()
