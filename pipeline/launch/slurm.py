"""`t2i submit | status | cancel`: a pipeline as SLURM jobs, one `sbatch` per stage, chained
with `--dependency=afterok`.

Each job script is saved as `runs/PIPELINE/slurm/STAGE.sbatch` and reads like one a person would
write. Every value that comes from a config is quoted for the shell (`shlex.quote`): a path or
name with spaces, quotes, `;` or `$(...)` is data, never a command. The job asks for `--requeue`
and for SIGUSR1 `launch.signal_grace_s` seconds before its time limit; on that signal (or a plain
`scontrol requeue`, which sends SIGTERM) the stage checkpoints at the next step boundary and the
job requeues itself; the requeued job resumes from the checkpoint. It requeues only after a
checkpoint that this attempt wrote, and at most `launch.max_restarts` times, so a job that cannot
resume fails instead of restarting forever. Each attempt appends its outcome to the stage folder's
attempts log, which `t2i status` reads.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from pipeline.engine.checkpoint import latest, step_of
from pipeline.launch.config import LaunchConfig
from pipeline.launch.dag import Job, RunConflict, check_folders, forced_stages, load_pipeline
from pipeline.markers import ATTEMPTS_LOG, COMPLETE_MARKER, PREEMPTED_EXIT_CODE, PREEMPTED_MARKER, StageError
from pipeline.owner import check_free

JOBS_FILE = "jobs.json"
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.:,=@%+/\-]*$")


def job_script(job: Job, pipeline_name: str, workdir: Path) -> str:
    """The sbatch script for one job."""
    launch: LaunchConfig = getattr(job.cfg, "launch", None) or LaunchConfig()
    out = job.out_dir.resolve()
    directives = [
        f"--job-name={_directive(f't2i-{pipeline_name}-{job.name}')}",
        f"--output={_directive(str(out / 'slurm-%j.out'))}",
        "--open-mode=append",
        f"--nodes={launch.nnodes}",
        "--ntasks-per-node=1",  # one launcher per node; it starts nproc_per_node processes
        f"--cpus-per-task={launch.cpus_per_task}",
        f"--time={_directive(launch.time)}",
        "--requeue",
        f"--signal=B:USR1@{launch.signal_grace_s}",
        "--kill-on-invalid-dep=yes",  # a job whose input failed is cancelled, not left pending
    ]
    directives += [f"--gpus-per-node={launch.gpus_per_node}"] * (launch.gpus_per_node > 0)
    directives += [f"--{key}={_directive(value)}" for key, value in
                   (("mem", launch.mem), ("partition", launch.partition), ("account", launch.account),
                    ("qos", launch.qos)) if value]
    directives += [_directive(option) for option in launch.sbatch_extra]
    stage_args = ["stage", job.stage, *(["-c", str(Path(job.config_path).resolve())] if job.config_path else []),
                  *job.overrides]
    launcher = [sys.executable, "-m", "pipeline.launch.node", f"--nproc-per-node={launch.nproc_per_node}",
                f"--grace={launch.signal_grace_s}", "--", *stage_args]
    lines = [
        "#!/bin/bash",
        f"# t2i: stage {job.name!r} of pipeline {pipeline_name!r}, written by `t2i submit`.",
        *(f"#SBATCH {directive}" for directive in directives),
        "",
        "set -uo pipefail",
        f"cd {shlex.quote(str(workdir))}",
        *([f"source {shlex.quote(launch.site_hook)}"] if launch.site_hook else []),
        f"out={shlex.quote(str(out))}",
        'restart="${SLURM_RESTART_COUNT:-0}"',
        f"record() {{ printf '%s\\t%s\\t%s\\t%s\\n' \"$SLURM_JOB_ID\" \"$restart\" \"$1\" \"$2\" >> \"$out/{ATTEMPTS_LOG}\"; }}"
        "  # exit code, outcome",
        'echo "t2i: job $SLURM_JOB_ID start $(date +%s.%N) restart $restart on $SLURM_JOB_NODELIST"',
        "# A marker left by an earlier attempt says nothing of this one: only a checkpoint this attempt",
        "# writes may requeue the job (a resume that crashes must not requeue it forever).",
        f'rm -f "$out/{PREEMPTED_MARKER}"',
        "",
        "# One launcher per node (pipeline/launch/node.py) starts torchrun with the rendezvous on the",
        "# allocation's first node. SLURM's warning signal (B:USR1) reaches this shell only: pass it on;",
        "# the stage checkpoints at its next step boundary and leaves $out/PREEMPTED.",
        f"srun --nodes={launch.nnodes} --ntasks-per-node=1 --kill-on-bad-exit=1 {shlex.join(launcher)} &",
        "step=$!",
        'trap \'echo "t2i: USR1: time limit near, checkpointing"; kill -USR1 "$step"\' USR1',
        'wait "$step"; code=$?',
        'while kill -0 "$step" 2>/dev/null; do wait "$step"; code=$?; done  # wait again after a trap',
        "",
        f'if [ -e "$out/{PREEMPTED_MARKER}" ] && [ "$restart" -lt {launch.max_restarts} ]; then',
        "    outcome=requeued",
        f'elif [ -e "$out/{PREEMPTED_MARKER}" ]; then',
        f'    outcome="checkpointed, not requeued: launch.max_restarts={launch.max_restarts} reached"; code={PREEMPTED_EXIT_CODE}',
        'elif [ "$code" -eq 0 ]; then',
        f"    printf '%s\\n' {shlex.quote(job.hash)} > \"$out/{COMPLETE_MARKER}\"",
        "    outcome=completed",
        "else",
        "    outcome=failed",
        "fi",
        'record "$code" "$outcome"',
        'echo "t2i: job $SLURM_JOB_ID end $(date +%s.%N) exit $code: $outcome"',
        'if [ "$outcome" = requeued ]; then',
        '    echo "t2i: checkpointed; requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
        f"    record {PREEMPTED_EXIT_CODE} 'checkpointed, but scontrol requeue failed'",
        f"    exit {PREEMPTED_EXIT_CODE}",
        "fi",
        'exit "$code"',
    ]
    return "\n".join(lines) + "\n"


def _directive(value: str) -> str:
    """A value for an `#SBATCH` line, which sbatch reads without a shell: plain values as they
    are, others in double quotes; a double quote or newline cannot be expressed and is refused."""
    if _SAFE_VALUE.match(value):
        return value
    if '"' in value or "\n" in value or "\\" in value:
        raise ValueError(f"cannot pass {value!r} to sbatch: it contains a double quote, backslash or newline")
    key, sep, rest = value.partition("=")
    return f'{key}="{rest}"' if sep and key.startswith("--") else f'"{value}"'


def submit(pipeline: str | Path, dry_run: bool = False, from_stage: str | None = None, discard: bool = False) -> int:
    """Submits the pipeline's incomplete stages; prints the scripts instead with `dry_run`.
    `from_stage` and `discard` and the refusal of folders holding other runs are `t2i run`'s (dag.py)."""
    name, jobs = load_pipeline(pipeline)
    forced = forced_stages(jobs, from_stage, pipeline)
    check_folders(jobs, forced, f"t2i submit {pipeline}")
    workdir = Path.cwd().resolve()
    root = jobs[0].out_dir.parent
    check_free(root)  # a `t2i run` of this pipeline is at work here
    record = _read_record(root)
    _refuse_active(jobs, forced, record)
    submitted: dict[str, str] = {}
    for job in jobs:
        if job.name not in forced and job.is_complete():
            print(f"{job.name}: complete, not submitted ({job.out_dir})")
            continue
        script = job_script(job, name, workdir)
        dependencies = [submitted[need] for need in job.needs if need in submitted]
        options = [f"--dependency=afterok:{':'.join(dependencies)}"] if dependencies else []
        if dry_run:
            print(f"# sbatch {shlex.join(options)} {job.name}.sbatch\n{script}")
            submitted[job.name] = f"<{job.name}>"
            continue
        note = job.prepare(fresh=job.name in forced, discard=discard)
        if note:
            print(f"{job.name}: {note}")
        path = root / "slurm" / f"{job.name}.sbatch"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
        try:
            result = subprocess.run(["sbatch", "--parsable", *options, str(path)], capture_output=True, text=True)
        except FileNotFoundError:
            raise StageError("sbatch not found: t2i submit needs SLURM's commands on PATH "
                             "(t2i run runs a pipeline on this machine without them)") from None
        if result.returncode != 0:
            withdrawn = _withdraw(root, record, submitted)
            raise StageError(f"sbatch refused stage {job.name!r} ({path}): "
                             f"{result.stderr.strip() or result.stdout.strip()}\n{withdrawn}")
        submitted[job.name] = result.stdout.strip().split(";")[0]
        record[job.name] = {"job": submitted[job.name], "script": str(path), "out_dir": str(job.out_dir.resolve()),
                            "needs": job.needs}
        print(f"{job.name}: submitted job {submitted[job.name]}"
              f"{' after ' + ', '.join(job.needs) if dependencies else ''}")
    if not dry_run:
        _write_record(root, record)
    return 0


def _withdraw(root: Path, record: dict, submitted: dict[str, str]) -> str:
    """Cancels the jobs a failed submission had queued, or records them when that fails so that
    `t2i cancel` reaches them: none is left queued and unknown. Says which it did."""
    if not submitted:
        return "No job of this submission was queued."
    jobs = ", ".join(f"{stage} (job {job})" for stage, job in submitted.items())
    if subprocess.run(["scancel", *submitted.values()], capture_output=True).returncode == 0:
        return f"Cancelled the jobs this submission had queued before it: {jobs}. Fix the cause and submit again."
    _write_record(root, record)
    return f"Could not cancel the jobs queued before it, {jobs}; they are recorded: t2i cancel {root}"


_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
           "SUSPENDED", "RESIZING", "STAGE_OUT"}


def _refuse_active(jobs: list[Job], forced: set[str], record: dict) -> None:
    """Raises RunConflict when a stage about to be submitted still has a job queued or running
    from an earlier submission: two jobs would write its folder (one of them perhaps moved away)."""
    busy = []
    for job in jobs:
        if job.name in record and (job.name in forced or not job.is_complete()):
            state = _job_state(record[job.name]["job"])[0]
            if state in _ACTIVE:
                busy.append(f"{job.name} (job {record[job.name]['job']}, {state})")
    if busy:
        raise RunConflict(f"stages still queued or running from an earlier submission: {', '.join(busy)}; wait for "
                          "them, or cancel them (t2i cancel RUN), then submit again")


def _read_record(root: Path) -> dict:
    path = root / "slurm" / JOBS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _write_record(root: Path, record: dict) -> None:
    path = root / "slurm" / JOBS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))


def stage_states(run: str | Path) -> list[dict]:
    """For each submitted stage of a run folder: job id, state, elapsed, last checkpoint, log."""
    root = Path(run)
    record = _read_record(root)
    if not record:
        raise FileNotFoundError(f"{root}: no SLURM jobs recorded (expected {root / 'slurm' / JOBS_FILE})")
    rows = []
    for name, entry in record.items():
        state, elapsed, reason = _job_state(entry["job"])
        out = Path(entry["out_dir"])
        if state in ("", "UNKNOWN"):
            state = "COMPLETED" if (out / COMPLETE_MARKER).exists() else "UNKNOWN"
        if reason in ("DependencyNeverSatisfied", "Dependency") or state == "PENDING":
            failed = [need for need in entry["needs"] if need in record and
                      _job_state(record[need]["job"])[0] in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")]
            if failed:
                state = f"{state} (dependency failed: {', '.join(failed)})"
            elif reason == "Dependency":
                state = "PENDING (waiting on dependency)"
        checkpoint = latest(out / "checkpoints")
        log = out / f"slurm-{entry['job']}.out"
        rows.append({"stage": name, "job": entry["job"], "state": state, "elapsed": elapsed,
                     "checkpoint": step_of(checkpoint) if checkpoint else None,
                     "attempts": attempts_of(out, entry["job"]), "cause": failure_cause(log), "log": str(log)})
    return rows


def attempts_of(out: Path, job_id: str) -> list[str]:
    """The outcome of each attempt of job `job_id` in stage folder `out`, oldest first, as its job
    script recorded them ('restart 1: failed (exit 1)'); none for an attempt still running or killed."""
    path = out / ATTEMPTS_LOG
    rows = [line.split("\t") for line in path.read_text().splitlines()] if path.exists() else []
    return [f"restart {restart}: {outcome}" + (f" (exit {code})" if code not in ("0", str(PREEMPTED_EXIT_CODE)) else "")
            for job, restart, code, outcome in (row for row in rows if len(row) == 4) if job == job_id]


def failure_cause(log: Path, tail_bytes: int = 1 << 20) -> str:
    """The last error in the end of a job's log: a `t2i: error:` or `t2i: config error:` line, or the
    exception that ended the last Python traceback, torchrun's ChildFailedError passed over (it only
    says a rank failed, whose own error is above it); empty when there is none."""
    if not log.exists():
        return ""
    with open(log, "rb") as handle:
        handle.seek(max(0, log.stat().st_size - tail_bytes))
        lines = handle.read().decode(errors="replace").splitlines()
    cause, in_traceback = "", False
    for line in lines:
        if line.startswith(("t2i: error:", "t2i: config error:")):
            cause, in_traceback = line.removeprefix("t2i: ").removeprefix("error: ").strip(), False
        elif line.startswith("Traceback (most recent call last)"):
            in_traceback = True
        elif in_traceback and line and not line[0].isspace():
            in_traceback = False
            if "ChildFailedError" not in line:
                cause = line.strip()
    return cause


def _job_state(job_id: str) -> tuple[str, str, str]:
    """(state, elapsed, reason) from scontrol, or empty strings once SLURM has forgotten the job."""
    result = subprocess.run(["scontrol", "show", "job", job_id, "-o"], capture_output=True, text=True)
    if result.returncode != 0:
        return "", "", ""
    fields = dict(item.split("=", 1) for item in result.stdout.split() if "=" in item)
    return fields.get("JobState", ""), fields.get("RunTime", ""), fields.get("Reason", "")


def print_status(run: str | Path) -> int:
    rows = stage_states(run)
    width = max(len(row["stage"]) for row in rows)
    for row in rows:
        checkpoint = f"step {row['checkpoint']}" if row["checkpoint"] is not None else "no checkpoint"
        print(f"{row['stage']:<{width}}  job {row['job']:<8} {row['state']:<40} {row['elapsed'] or '-':>10}  "
              f"{checkpoint:<14} {row['log']}")
        troubled = [attempt for attempt in row["attempts"] if not attempt.endswith(("requeued", "completed"))]
        if len(row["attempts"]) > 1 or troubled:  # a stage that restarted or failed says how
            print(f"{'':<{width}}  attempts: {'; '.join(row['attempts'])}")
        if troubled and row["cause"]:
            print(f"{'':<{width}}  last error: {row['cause']}")
    return 0


def cancel(run: str | Path) -> int:
    record = _read_record(Path(run))
    ids = [entry["job"] for entry in record.values()]
    if ids:
        subprocess.run(["scancel", *ids], check=True)
    print(f"cancelled {len(ids)} job(s): {' '.join(ids)}")
    return 0
