"""`t2i run`: a pipeline's stages on this machine, in dependency order, each in its own processes."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from pipeline.launch.dag import downstream, load_pipeline
from pipeline.report import write_report


def stage_command(stage: str, config_path: str | None, overrides: list[str], cfg) -> list[str]:
    """The command that runs one stage: python for a one-process stage, torchrun with the
    config's process count for several."""
    args = ["-m", "pipeline.cli", "stage", stage, *(["-c", config_path] if config_path else []), *overrides]
    launch = getattr(cfg, "launch", None)
    if launch is not None and launch.nproc_per_node > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={launch.nproc_per_node}", *args]
    return [sys.executable, *args]


def run_pipeline(path: str | os.PathLike, from_stage: str | None = None) -> int:
    """Runs the pipeline's incomplete stages; returns 0, or the exit code of the stage that failed."""
    name, jobs = load_pipeline(path)
    if from_stage is not None and from_stage not in {job.name for job in jobs}:
        raise ValueError(f"--from {from_stage!r}: no such stage in {path}")
    forced = downstream(jobs, from_stage) if from_stage else set()
    for job in jobs:
        if job.name not in forced and job.is_complete():
            print(f"[{name}] {job.name}: complete, skipped ({job.out_dir})", flush=True)
            continue
        job.prepare(fresh=job.name in forced)
        log = job.out_dir / "log.txt"
        command = stage_command(job.stage, job.config_path, job.overrides, job.cfg)
        print(f"[{name}] {job.name}: {shlex.join(command)}\n[{name}] {job.name}: log {log}", flush=True)
        code = _run_logged(command, log)
        if code != 0:
            print(f"[{name}] {job.name}: FAILED with exit code {code}; log: {log}", file=sys.stderr, flush=True)
            return code
        job.mark_complete()
    report = write_report(name, jobs, jobs[0].out_dir.parent / "report.html")
    print(f"[{name}] all {len(jobs)} stages complete; report: {report}", flush=True)
    return 0


def _run_logged(command: list[str], log: Path) -> int:
    """Runs `command`, copying its output to this terminal and to `log`."""
    with open(log, "ab") as handle:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert process.stdout is not None
        while chunk := process.stdout.read1(65536):
            handle.write(chunk)
            handle.flush()
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        return process.wait()
