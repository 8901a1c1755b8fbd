"""Which raw samples each rank and each loader worker reads in an epoch.

Exactly-once epochs: the shards (shuffled by seed and epoch, the same on every rank) are laid end
to end; rank r takes the contiguous samples [r*N/W, (r+1)*N/W), so ranks differ by at most one
sample and all run ceil(ceil(N/W)/B) steps. A rank's batch t is made by its worker t % workers,
which reads one contiguous run of the rank's samples; a worker that runs short pads its last
batches with samples flagged invalid. Resampled: each worker draws whole shards at random with
replacement, forever.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Segment:
    """Raw samples [start, stop) of one shard, in tar order."""

    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class WorkerPlan:
    """What one logical worker reads: a finite list of segments and a fixed batch count (exactly-once
    epochs), or an endless stream of drawn shards (`segments` is None, `batches` is None)."""

    worker: int
    segments: tuple[Segment, ...] | None
    batches: int | None


def steps_per_epoch(sizes: list[int], world_size: int, batch_size: int) -> int:
    """Batches every rank yields in one exactly-once epoch (the same number on every rank)."""
    return math.ceil(math.ceil(sum(sizes) / world_size) / batch_size)


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The order the shards are laid out in for an epoch; identical on every rank."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(f"shards-{seed}-{epoch}").shuffle(order)
    return order


def plan_epoch(sizes: list[int], *, epoch: int, seed: int, rank: int, world_size: int,
               batch_size: int, workers: int, shuffle_shards: bool) -> list[WorkerPlan]:
    """Splits one exactly-once epoch into per-worker plans for `rank` (see the module docstring)."""
    total = sum(sizes)
    steps = steps_per_epoch(sizes, world_size, batch_size)
    rank_start, rank_stop = rank * total // world_size, (rank + 1) * total // world_size
    order = shard_order(len(sizes), seed, epoch, shuffle_shards)
    plans, cursor = [], rank_start
    for worker in range(workers):
        batches = len(range(worker, steps, workers))
        stop = min(rank_stop, cursor + batches * batch_size)
        plans.append(WorkerPlan(worker, tuple(_segments(sizes, order, cursor, stop)), batches))
        cursor = stop
    return plans


def _segments(sizes: list[int], order: list[int], start: int, stop: int) -> Iterator[Segment]:
    """The pieces of shards covering global sample positions [start, stop) of the laid-out epoch."""
    offset = 0
    for shard in order:
        size = sizes[shard]
        lo, hi = max(start, offset), min(stop, offset + size)
        if lo < hi:
            yield Segment(shard, lo - offset, hi - offset)
        offset += size
        if offset >= stop:
            return


def resampled_segment(sizes: list[int], *, seed: int, rank: int, worker: int, draw: int) -> Segment:
    """The `draw`-th shard a resampling worker reads: uniform over non-empty shards, reproducible."""
    nonempty = [index for index, size in enumerate(sizes) if size > 0]
    shard = random.Random(f"draw-{seed}-{rank}-{worker}-{draw}").choice(nonempty)
    return Segment(shard, 0, sizes[shard])
