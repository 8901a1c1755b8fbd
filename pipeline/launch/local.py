"""`t2i run`: a pipeline's stages on this machine, in dependency order, each in its own processes.

With `jobs` > 1, up to that many stages whose inputs are complete run at once, each pinned to its
own share of the CPU cores (stages size their threads from their affinity), its output going to
its log only. A stage that starts when nothing else runs or is ready gets every core and the
terminal too: nothing can become ready before it ends. Ready stages start longest chain of
dependents first, so the pipeline's critical path never waits behind a side branch. Concurrent
stages share the machine's GPUs.

Ctrl-C (or SIGTERM, SIGHUP) sends the running stages SIGTERM, on which training stages checkpoint,
and waits for them; a second one kills them. Stages run in their own sessions, so a terminal's
Ctrl-C reaches them only this way, never as a SIGINT that would unwind training without a checkpoint.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from pipeline.launch.dag import Job, check_folders, forced_stages, load_pipeline
from pipeline.markers import INTERRUPTED_EXIT_CODE
from pipeline.owner import owned
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


def core_slots(cores: list[int], jobs: int) -> list[frozenset[int]]:
    """The cores split into `jobs` disjoint slots of consecutive cores, as even as possible, the
    largest first: the most urgent stage takes the first free slot."""
    if not 1 <= jobs <= len(cores):
        raise ValueError(f"--jobs {jobs}: this process may use {len(cores)} CPU core(s), "
                         f"so 1 to {len(cores)} stages can run at once")
    slots = [frozenset(cores[len(cores) * i // jobs:len(cores) * (i + 1) // jobs]) for i in range(jobs)]
    return sorted(slots, key=len, reverse=True)


def chain_lengths(jobs: list[Job]) -> dict[str, int]:
    """For each job, the number of jobs on its longest chain of dependents."""
    lengths: dict[str, int] = {}
    for job in reversed(jobs):  # dependents come after their needs
        lengths[job.name] = max((1 + lengths[other.name] for other in jobs if job.name in other.needs), default=0)
    return lengths


@dataclass
class _Running:
    job: Job
    process: subprocess.Popen
    slots: list[int]  # indices into the core slots
    copier: threading.Thread  # copies the output to the log
    problems: list[str]  # what the copier could not write
    started: float = field(default_factory=time.monotonic)


def run_pipeline(path: str | os.PathLike, from_stage: str | None = None, jobs: int = 1, discard: bool = False) -> int:
    """Runs the pipeline's incomplete stages, up to `jobs` at once; returns 0, the exit code of
    the first stage that failed (stages already running are let finish; no new one starts), or
    INTERRUPTED_EXIT_CODE after Ctrl-C, SIGTERM or SIGHUP once the running stages have stopped.
    `from_stage` starts that stage and its dependents again, their folders kept as STAGE.old-N
    (deleted with `discard`). Raises RunConflict, before any stage runs, when a stage's folder
    holds a run of other result-changing values or another process writes it (dag.py), and
    FolderBusy when another `t2i run` works in the pipeline's run folder."""
    name, all_jobs = load_pipeline(path)
    forced = forced_stages(all_jobs, from_stage, path)
    with owned(all_jobs[0].out_dir.parent):  # a second `t2i run` of this pipeline is refused (FolderBusy)
        check_folders(all_jobs, forced, f"t2i run {path}")
        return _run_jobs(name, all_jobs, forced, jobs, discard)


def _run_jobs(name: str, all_jobs: list[Job], forced: set[str], jobs: int, discard: bool) -> int:
    slots = core_slots(sorted(os.sched_getaffinity(0)), jobs)
    done: set[str] = set()
    waiting: list[Job] = []
    for job in all_jobs:
        if job.name not in forced and job.is_complete():
            print(f"[{name}] {job.name}: complete, skipped ({job.out_dir})", flush=True)
            done.add(job.name)
        else:
            waiting.append(job)
    priority = chain_lengths(all_jobs)
    running: list[_Running] = []
    failure = 0
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while waiting or running:
            free = [i for i in range(len(slots)) if not any(i in r.slots for r in running)]
            ready = sorted((job for job in waiting if done.issuperset(job.needs)),
                           key=lambda job: -priority[job.name])  # stable: file order among equals
            while not failure and free and ready:
                job = ready.pop(0)
                alone = not running and not ready
                taken, free = (free, []) if alone else ([free[0]], free[1:])
                waiting.remove(job)
                running.append(_start(name, job, job.name in forced, discard, taken, slots, echo=jobs == 1 or alone))
            if not running:
                break
            finished = _wait_any(running)
            running.remove(finished)
            code = finished.process.returncode
            for problem in finished.problems:
                print(f"[{name}] {finished.job.name}: output lost: {problem}", file=sys.stderr, flush=True)
            if code == 0:
                finished.job.mark_complete()
                done.add(finished.job.name)
                minutes, seconds = divmod(round(time.monotonic() - finished.started), 60)
                print(f"[{name}] {finished.job.name}: done in {minutes}m{seconds:02d}s", flush=True)
            else:
                log = finished.job.out_dir / "log.txt"
                print(f"[{name}] {finished.job.name}: FAILED with exit code {code}; log: {log}", file=sys.stderr, flush=True)
                failure = failure or code
                if running:
                    print(f"[{name}] waiting for the {len(running)} stage(s) still running; no new stage starts",
                          file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print(f"\n[{name}] interrupted: stopping {', '.join(r.job.name for r in running) or 'nothing'} "
              "(training stages checkpoint first; interrupt again to kill)", file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_CODE
    finally:
        _stop(running)  # a stage is left running only after an exception
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure:
        return failure
    report = write_report(name, all_jobs, all_jobs[0].out_dir.parent / "report.html")
    print(f"[{name}] all {len(all_jobs)} stages complete; report: {report}", flush=True)
    return 0


def _start(name: str, job: Job, fresh: bool, discard: bool, taken: list[int], slots: list[frozenset[int]],
           echo: bool) -> _Running:
    """Starts `job` (afresh when `fresh`, its old folder kept aside or, with `discard`, deleted) on
    the cores of slots `taken`, its output appended to its log (and copied to this terminal when `echo`)."""
    note = job.prepare(fresh=fresh, discard=discard)
    if note:
        print(f"[{name}] {job.name}: {note}", flush=True)
    log = job.out_dir / "log.txt"
    command = stage_command(job.stage, job.config_path, job.overrides, job.cfg)
    cores = sorted(frozenset().union(*(slots[i] for i in taken)))
    print(f"[{name}] {job.name}: {shlex.join(command)}\n[{name}] {job.name}: log {log}", flush=True)
    if len(slots) > 1:
        print(f"[{name}] {job.name}: started on CPU core(s) {','.join(map(str, cores))}", flush=True)
    outputs = [open(log, "ab"), *([sys.stdout.buffer] if echo else [])]
    # Between fork and exec the child only sets its affinity, a system call: no lock the copier
    # threads may hold is touched. Its threads and processes inherit the affinity.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                               preexec_fn=lambda: os.sched_setaffinity(0, cores))
    problems: list[str] = []
    copier = threading.Thread(target=copy_output, args=(process, outputs, problems), daemon=True)
    copier.start()
    return _Running(job, process, taken, copier, problems)


def copy_output(process: subprocess.Popen, outputs: list, problems: list[str]) -> None:
    """Copies the process's output to `outputs` (the log first, which it closes at the end) until
    the output ends. It reads to the end whatever happens: a stage whose pipe is not read blocks.
    An output that fails (a full disk, a closed terminal) is dropped, and the error added to `problems`."""
    assert process.stdout is not None
    log, live = outputs[0], list(outputs)
    try:
        while chunk := process.stdout.read1(65536):
            for output in list(live):
                try:
                    output.write(chunk)
                    output.flush()
                except (OSError, ValueError) as error:
                    live.remove(output)
                    problems.append(f"{getattr(output, 'name', 'output')}: {error}")
    finally:
        log.close()


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _stop(running: list[_Running]) -> None:
    """Sends every running stage SIGTERM (training stages checkpoint on it) and waits for them all;
    an interrupt while waiting kills them, with everything they started."""
    for stage in running:
        stage.process.terminate()
    try:
        for stage in running:
            stage.process.wait()
    except KeyboardInterrupt:
        for stage in running:
            with contextlib.suppress(ProcessLookupError):  # its own session: loader workers, torchrun's ranks
                os.killpg(stage.process.pid, signal.SIGKILL)
            stage.process.wait()
    for stage in running:
        stage.copier.join(timeout=5)


def _wait_any(running: list[_Running]) -> _Running:
    """The first of the running stages to end, after its output is all copied."""
    while True:
        for stage in running:
            if stage.process.poll() is not None:
                stage.copier.join()
                return stage
        time.sleep(0.2)
