"""One writer per folder: a stage's folder while its stage runs, a pipeline's run folder while
`t2i run` works in it.

The owner holds a POSIX record lock (`fcntl.lockf`) on the folder's `.t2i-owner` file, which
records who it is (host, process, SLURM job, command, since when) for the message a second writer
gets. The lock belongs to the process: its forked data-loader workers do not inherit it (as they
would a `flock`, keeping it after a `kill -9` of the run), and the kernel releases it when the
process dies, however it dies, so a killed run never leaves a stale lock behind. On NFS the lock
goes through the lock manager (NFSv3: a client that crashes holds its locks until it comes back);
a file system without locks (ENOLCK, ENOSYS: `nolock` mounts, Lustre without flock) gets a warning
that a second writer will go undetected, not a refusal. The file stays (removing a lock file races
with the next owner); the owner never opens it a second time, as closing any descriptor of it would
release the lock.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

OWNER_FILE = ".t2i-owner"


class FolderBusy(ValueError):
    """Another process owns the folder; the message names it. A refusal: exit code 2."""


@contextlib.contextmanager
def owned(folder: str | os.PathLike) -> Iterator[None]:
    """Owns `folder` (created if absent) while the block runs; raises FolderBusy, naming the
    owner, when another process owns it. Not reentrant: a process owns a folder once."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / OWNER_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if _lock(fd, fcntl.LOCK_EX, folder):
            me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
                  "command": " ".join(sys.argv), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def check_free(folder: str | os.PathLike) -> None:
    """Raises FolderBusy, naming the owner, when another process owns `folder`; touches nothing
    when the folder has never been owned. Never called by the owner itself (see the module docstring)."""
    path = Path(folder) / OWNER_FILE
    if not path.exists():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        _lock(fd, fcntl.LOCK_SH, Path(folder))
    finally:
        os.close(fd)


def _lock(fd: int, kind: int, folder: Path) -> bool:
    """Takes a lock of `kind` on `fd` without waiting: True when taken, FolderBusy when another
    process holds it, False (with a warning) when the file system has no locks."""
    try:
        fcntl.lockf(fd, kind | fcntl.LOCK_NB)
        return True
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EACCES):
            raise FolderBusy(_busy_message(folder)) from None
        if error.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    print(f"t2i: warning: {folder}'s file system has no locks: a second writer of it will not be refused",
          file=sys.stderr, flush=True)
    return False


def _busy_message(folder: Path) -> str:
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
        job = f", SLURM job {owner['slurm_job']}" if owner.get("slurm_job") else ""
        who = f"process {owner['pid']} on {owner['host']}{job} (`{owner['command']}`, since {owner['since']})"
    except (OSError, ValueError, KeyError):  # the owner is still writing its record
        who = "another process"
    return f"{folder} is being written by {who}: wait for it to end, or stop it, before writing there"
