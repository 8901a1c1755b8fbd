"""`t2i run`: a pipeline's stages on this machine, in dependency order, each in its own processes."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from pipeline.launch.dag import Job, downstream, load_pipeline


def stage_command(job: Job) -> list[str]:
    """The command that runs one job: python for a one-process stage, torchrun for several."""
    args = ["-m", "pipeline.cli", "stage", job.stage]
    if job.config_path:
        args += ["-c", job.config_path]
    args += job.overrides
    launch = getattr(job.cfg, "launch", None)
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
        job.out_dir.mkdir(parents=True, exist_ok=True)
        job.clear_complete()
        log = job.out_dir / "log.txt"
        command = stage_command(job)
        print(f"[{name}] {job.name}: {shlex.join(command)}\n[{name}] {job.name}: log {log}", flush=True)
        code = _run_logged(command, log)
        if code != 0:
            print(f"[{name}] {job.name}: FAILED with exit code {code}; log: {log}", file=sys.stderr, flush=True)
            return code
        job.mark_complete()
    print(f"[{name}] all {len(jobs)} stages complete", flush=True)
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
