"""One writer per folder (pipeline/owner.py): a second writer is refused with a message naming the
first, and the ownership dies with its holder, with real processes."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.owner import check_free, owned
from tests.engine.conftest import toy_overrides


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None and time.time() < deadline, process.communicate()[0]
        time.sleep(0.05)


def _t2i(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def test_a_second_writer_of_a_training_folder_is_refused_and_a_killed_owner_leaves_no_lock(shapes_shards, tmp_path):
    out = tmp_path / "run"
    args = ["stage", "tests.engine.toy_stage", *toy_overrides(shapes_shards, out, **{"trainer.max_steps": 200,
                                                                                     "model.sleep_s": 0.2})]
    first = _t2i(*args, start_new_session=True)
    _wait_for(out / "metrics.jsonl", first)
    second = _t2i(*args)
    output = second.communicate(timeout=120)[0]
    # Before: the second run trained the same folder, deleting the first's temporary checkpoints.
    assert second.returncode == 2 and f"is being written by process {first.pid} on " in output, output
    assert "stage tests.engine.toy_stage" in output and first.poll() is None
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    check_free(out)  # the kernel released the lock with its holder
    third = _t2i(*args[:-2], "trainer.max_steps=2", "model.sleep_s=0")
    assert third.communicate(timeout=300)[0] and third.returncode == 0


def test_a_second_t2i_run_of_a_pipeline_is_refused_while_the_first_works(tmp_path):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"name: p\nout_dir: {tmp_path / 'runs'}\nstages:\n"
                        "  slow: {stage: tests.probe_stage, overrides: [sleep_s=4]}\n")
    first = _t2i("run", str(pipeline))
    _wait_for(tmp_path / "runs" / "p" / "slow" / "started", first)
    second = _t2i("run", str(pipeline))
    output = second.communicate(timeout=120)[0]
    assert second.returncode == 2 and f"is being written by process {first.pid} on " in output, output
    assert first.communicate(timeout=120)[0] and first.returncode == 0
    assert (tmp_path / "runs" / "p" / "slow" / "probe.json").exists()


def test_ownership_is_exclusive_and_dies_with_its_process_not_with_its_forked_children(tmp_path):
    folder = tmp_path / "f"
    with owned(folder):
        other = subprocess.run([sys.executable, "-c", f"from pipeline.owner import check_free; check_free({str(folder)!r})"],
                               capture_output=True, text=True)
        assert other.returncode != 0 and f"process {os.getpid()}" in other.stderr
    check_free(folder)
    # An owner that forks (as the data loader does) and is killed: its child must not keep the folder.
    program = ("import os, signal, time\nfrom pipeline.owner import owned\n"
               f"with owned({str(folder)!r}):\n"
               "    child = os.fork()\n"
               "    if child == 0:\n        time.sleep(60)\n        os._exit(0)\n"
               "    print(child, flush=True)\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    owner = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    child = int(owner.stdout.readline())
    try:
        assert owner.wait(timeout=60) == -signal.SIGKILL
        check_free(folder)  # before (flock): the sleeping child still held it
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_file_system_without_locks_gets_a_warning_not_a_refusal(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(fd, kind):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    with owned(tmp_path / "f"):
        check_free(tmp_path / "f")
    assert "has no locks: a second writer of it will not be refused" in capsys.readouterr().err
