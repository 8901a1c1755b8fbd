"""The local two-node SLURM cluster behaves like a real one: multi-node jobs, dependencies, requeue,
job completion records and (slow, T2I_SLOW=1) pre-timeout signals.

Jobs run as root on this machine, so they read and write the test's tmp_path directly.
"""
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "slurm" / "local-cluster.sh"
JOBCOMP = Path("/var/log/slurm/jobcomp.log")  # JobCompLoc in slurm/local-cluster.sh
START_TIMEOUT = 120  # seconds a job may wait for a node (other tests may share the cluster)


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (finished jobs stay visible for MinJobAge=600 s)."""
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return dict(re.findall(r"(?:^|\s)([A-Za-z][\w:/]*)=(\S*)", out))


def wait_until(condition, timeout: float, what: str, interval: float = 0.2):
    """Polls condition() until it returns something truthy, which it returns; fails after timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_for_state(job_id: str, states: set[str], timeout: float = START_TIMEOUT) -> dict[str, str]:
    return wait_until(lambda: (info := job_info(job_id))["JobState"] in states and info, timeout,
                      f"job {job_id} to reach {sorted(states)}")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


class Jobs:
    """Submits batch scripts into one folder under one job name, so a test's jobs are easy to clean up."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.name = f"t2i-test-{uuid.uuid4().hex[:8]}"
        self.count = 0

    def submit(self, body: str, *options: str, wait: bool = False, check: bool = True,
               timeout: float = START_TIMEOUT) -> str:
        """Submits `body` as a bash batch script; with wait=True returns once the job has ended."""
        self.count += 1
        script = self.folder / f"job{self.count}.sh"
        script.write_text("#!/bin/bash\nset -eu\n" + body)
        command = ["sbatch", "--parsable", f"--job-name={self.name}", f"--chdir={self.folder}",
                   f"--output={self.folder}/slurm-%j.out", *options, str(script)]
        if wait:
            command.insert(1, "--wait")
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, f"{command} exited {result.returncode}: {result.stderr}"
        return result.stdout.split(";")[0].split()[0]

    def output(self, job_id: str) -> str:
        return (self.folder / f"slurm-{job_id}.out").read_text()

    def cancel_all(self):
        subprocess.run(["scancel", f"--name={self.name}"], capture_output=True, timeout=30)


@pytest.fixture
def jobs(slurm_cluster, tmp_path):
    submitted = Jobs(tmp_path)
    yield submitted
    submitted.cancel_all()


def test_up_again_is_quick_and_changes_nothing(slurm_cluster):
    conf = Path("/etc/slurm/slurm.conf")
    before = conf.stat().st_mtime_ns
    started = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # nothing written, started or resumed
    assert conf.stat().st_mtime_ns == before
    assert elapsed < 5, f"up took {elapsed:.1f} s on a running cluster"  # about 0.2 s when idle
    status = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    assert all(f"slurmd {node}: running" in status.stdout for node in slurm_cluster), status.stdout


def test_job_runs_one_task_on_each_node(jobs, slurm_cluster):
    job = jobs.submit('srun bash -c \'echo "task $SLURM_PROCID of $SLURM_NTASKS on $SLURMD_NODENAME"\'\n',
                      "--nodes=2", "--ntasks-per-node=1", wait=True)
    output = jobs.output(job)
    assert sorted(re.findall(r"task \d of 2 on (\S+)", output)) == sorted(slurm_cluster), output
    assert job_info(job)["JobState"] == "COMPLETED"


def test_afterok_dependency_starts_after_its_parent_finished(jobs, tmp_path):
    first = jobs.submit("sleep 2\ndate +%s.%N > first.end\n")
    second = jobs.submit("date +%s.%N > second.start\n", f"--dependency=afterok:{first}")
    assert job_info(second)["Reason"] == "Dependency"
    wait_for_state(second, {"COMPLETED", "FAILED", "CANCELLED"})
    assert job_info(first)["JobState"] == "COMPLETED"
    assert job_info(second)["JobState"] == "COMPLETED"
    assert float((tmp_path / "second.start").read_text()) >= float((tmp_path / "first.end").read_text())


def test_afterok_on_a_failed_job_never_runs(jobs, tmp_path):
    failing = jobs.submit("exit 3\n")
    child = jobs.submit("touch child.ran\n", f"--dependency=afterok:{failing}")
    # Slurm 22.05 keeps the child pending for ever unless the cluster (SchedulerParameters=
    # kill_invalid_depend) or the job (--kill-on-invalid-dep=yes) asks for it to be cancelled.
    def never_satisfiable():
        info = job_info(child)
        return (info["Reason"] == "DependencyNeverSatisfied" or info["JobState"] == "CANCELLED") and info

    info = wait_until(never_satisfiable, START_TIMEOUT, "the dependency to be unsatisfiable")
    assert info["JobState"] in {"PENDING", "CANCELLED"}
    assert info["Dependency"] in {f"afterok:{failing}(failed)", "(null)"}
    parent = job_info(failing)
    assert (parent["JobState"], parent["ExitCode"]) == ("FAILED", "3:0")
    subprocess.run(["scancel", child], check=True, timeout=30)
    wait_for_state(child, {"CANCELLED"}, timeout=30)
    assert not (tmp_path / "child.ran").exists()


def test_requeued_job_runs_again(jobs, tmp_path):
    runs = tmp_path / "runs.txt"
    job = jobs.submit('echo "restart=${SLURM_RESTART_COUNT:-0} on $SLURMD_NODENAME" >> runs.txt\nsleep 300\n',
                      "--requeue")
    wait_until(lambda: len(lines(runs)) == 1 and job_info(job)["JobState"] == "RUNNING", START_TIMEOUT,
               "the job's first run")
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    # The job goes back to PENDING with Reason=BeginTime: Slurm delays a requeued job's start by the
    # credential lifetime (AuthInfo=cred_expire, 10 s on the local cluster, 120 s by default).
    seen = set()

    def ran_twice():
        info = job_info(job)
        seen.add((info["JobState"], info["Reason"]))
        return len(lines(runs)) >= 2

    wait_until(ran_twice, 60 + START_TIMEOUT, "the requeued job's second run")
    assert ("PENDING", "BeginTime") in seen, seen
    assert [line.split()[0] for line in lines(runs)] == ["restart=0", "restart=1"]
    assert job_info(job)["Restarts"] == "1"


def jobcomp_record(job_id: str, name: str) -> dict[str, str] | None:
    """The last job completion record of this job, or None."""
    record = None
    for line in lines(JOBCOMP):
        if line.startswith(f"JobId={job_id} ") and f" Name={name} " in line:
            record = dict(re.findall(r"(\w+)=(\S*)", line))
    return record


def test_jobcomp_file_records_final_states(jobs):
    completed = jobs.submit("true\n", wait=True)
    failed = jobs.submit("exit 7\n", wait=True, check=False)
    records = wait_until(lambda: all(r := [jobcomp_record(j, jobs.name) for j in (completed, failed)]) and r,
                         30, f"records of jobs {completed} and {failed} in {JOBCOMP}")
    assert [(r["JobState"], r["ExitCode"]) for r in records] == [("COMPLETED", "0:0"), ("FAILED", "7:0")]
    assert records[0]["NodeList"] in {"node1", "node2"}


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("T2I_SLOW") != "1", reason="takes about 70-100 s; set T2I_SLOW=1")
def test_batch_shell_gets_usr1_before_the_time_limit(jobs, tmp_path):
    # --signal=B:USR1@10 asks for USR1 10 s before the end, but slurmctld checks time limits only every
    # 30 s, so it may come up to a check period earlier ("up to 60 s earlier", says man sbatch); at the
    # limit every process of the job gets SIGTERM, and SIGKILL KillWait (30 s) later.
    body = ('trap \'echo "USR1 $(date +%s)" >> signals.txt\' USR1\n'
            'trap \'echo "TERM $(date +%s)" >> signals.txt; exit 0\' TERM\n'
            'echo "start $(date +%s)" >> signals.txt\n'
            'while true; do sleep 1 & wait $! || true; done\n')
    job = jobs.submit(body, "--signal=B:USR1@10", "--time=1")
    info = wait_for_state(job, {"TIMEOUT", "COMPLETED", "FAILED", "CANCELLED"}, timeout=START_TIMEOUT + 120)
    events = {line.split()[0]: int(line.split()[1]) for line in lines(tmp_path / "signals.txt")}
    assert info["JobState"] == "TIMEOUT"
    assert {"start", "USR1", "TERM"} <= set(events), events
    assert events["TERM"] - events["start"] >= 58, events
    assert events["TERM"] - events["USR1"] >= 9, events
