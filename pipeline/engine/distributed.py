"""Process-group setup from torchrun's environment, and the few collectives the loop needs.

The same code runs on CPU (gloo; DeepSpeed with DS_ACCELERATOR=cpu) and on NVIDIA GPUs (nccl).
A single process started without torchrun runs with no process group at all."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.engine.host_memory import keep_freed_memory


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(backend: str, timeout_s: int) -> DistInfo:
    """Joins torchrun's process group (if any) and picks this rank's device; on CPU, makes malloc keep
    freed memory (host_memory)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede DeepSpeed's import
        keep_freed_memory()
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "deepspeed":
        os.environ.setdefault("RANK", "0")  # DeepSpeed wants a process group even for one process
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timeout)
    elif world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return DistInfo(rank, world, local_rank, device)


def free_cores(data_workers: int) -> int:
    """Intra-op threads for this process on CPU: its share of the cores (torchrun's LOCAL_WORLD_SIZE
    processes per node) less its data-loader workers, at least 1. More threads than free cores make
    OpenMP's spinning threads wait on each other: a step can get ten times slower."""
    share = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, share - data_workers)


def any_rank(*flags: bool) -> list[bool]:
    """For each flag, whether it is set on any rank (one all-reduce for all of them)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(flags)
    tensor = torch.tensor([float(flag) for flag in flags],
                          device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(value) for value in tensor.tolist()]


def all_gather(value):
    """Every rank's `value` (picklable), in rank order, on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
