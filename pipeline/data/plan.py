"""Which raw samples each rank and each loader worker reads in an epoch.

Exactly-once epochs: the shards (shuffled by seed and epoch, the same on every rank) are laid end
to end. An epoch is planned over spans of that laid-out order: a whole epoch is the one span
[0, N); an epoch re-planned for a new world size or worker count is the spans still unread
(`unread_spans`). The spans' R samples are laid end to end; rank r takes the contiguous samples
[r*R/W, (r+1)*R/W), so ranks differ by at most one sample and all run ceil(ceil(R/W)/B) steps. A
rank's batch t is made by its worker t % workers, which reads one contiguous run of the rank's
samples; a worker that runs short pads its last batches with samples flagged invalid.
Resampled: each worker draws whole shards at random with replacement, forever.
"""
from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import dataclass
from typing import Iterator

Span = tuple[int, int]  # laid-out sample positions [start, stop)


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


def steps_per_epoch(spans: list[Span], world_size: int, batch_size: int) -> int:
    """Batches every rank yields in an exactly-once pass over `spans` (the same number on every rank)."""
    return math.ceil(math.ceil(sum(stop - start for start, stop in spans) / world_size) / batch_size)


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The order the shards are laid out in for an epoch; identical on every rank."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(f"shards-{seed}-{epoch}").shuffle(order)
    return order


def plan_epoch(sizes: list[int], spans: list[Span], *, epoch: int, seed: int, rank: int, world_size: int,
               batch_size: int, workers: int, shuffle_shards: bool) -> list[WorkerPlan]:
    """Splits an exactly-once pass over `spans` of the epoch's laid-out samples into per-worker plans
    for `rank` (see the module docstring); `[(0, sum(sizes))]` is the whole epoch."""
    total = sum(stop - start for start, stop in spans)
    steps = steps_per_epoch(spans, world_size, batch_size)
    rank_start, rank_stop = rank * total // world_size, (rank + 1) * total // world_size
    order = shard_order(len(sizes), seed, epoch, shuffle_shards)
    shards = [(0, sizes[shard]) for shard in order]
    span_ends, shard_ends = _ends(spans), _ends(shards)
    plans, cursor = [], rank_start
    for worker in range(workers):
        batches = len(range(worker, steps, workers))
        stop = min(rank_stop, cursor + batches * batch_size)
        segments = tuple(Segment(order[index], lo, hi)
                         for _, start, end in _pieces(spans, span_ends, cursor, stop)
                         for index, lo, hi in _pieces(shards, shard_ends, start, end))
        plans.append(WorkerPlan(worker, segments, batches))
        cursor = stop
    return plans


def unread_spans(sizes: list[int], spans: list[Span], positions: list[dict[int, tuple[int, int]]], *,
                 epoch: int, seed: int, batch_size: int, workers: int, shuffle_shards: bool) -> list[Span]:
    """What an epoch planned over `spans` for len(positions) ranks has left: every worker's run from
    the start of the chunk it is in to the run's end, in laid-out positions, in order, adjacent spans
    joined. `positions[rank][worker]` is that worker's (segment, offset of the chunk start); a worker
    missing from it has read nothing. Samples already taken from that chunk count as unread: fewer
    than `shuffle_buffer` per worker (none with a buffer of 0 or 1) are read again."""
    order = shard_order(len(sizes), seed, epoch, shuffle_shards)
    shard_starts = dict(zip(order, itertools.accumulate((sizes[shard] for shard in order), initial=0)))
    unread: list[Span] = []
    for rank, at in enumerate(positions):
        for plan in plan_epoch(sizes, spans, epoch=epoch, seed=seed, rank=rank, world_size=len(positions),
                               batch_size=batch_size, workers=workers, shuffle_shards=shuffle_shards):
            segment, offset = at.get(plan.worker, (0, 0))
            for index, piece in enumerate(plan.segments[segment:], start=segment):
                start = shard_starts[piece.shard] + piece.start + (offset if index == segment else 0)
                stop = shard_starts[piece.shard] + piece.stop
                if unread and unread[-1][1] == start:
                    unread[-1] = (unread[-1][0], stop)
                else:
                    unread.append((start, stop))
    return unread


def _ends(intervals: list[Span]) -> list[int]:
    """Where each interval ends when `intervals` are laid end to end from 0."""
    return list(itertools.accumulate(hi - lo for lo, hi in intervals))


def _pieces(intervals: list[Span], ends: list[int], start: int, stop: int) -> Iterator[tuple[int, int, int]]:
    """Positions [start, stop) of `intervals` laid end to end (`ends` from `_ends`), as (index of an
    interval, lo, hi): the parts [lo, hi) of those intervals that hold them, in order."""
    index = bisect.bisect_right(ends, start)
    while start < stop and index < len(intervals):
        lo, hi = intervals[index]
        end = min(stop, ends[index])
        if end > start:
            begin = ends[index] - (hi - lo)
            yield index, lo + start - begin, lo + end - begin
        start, index = end, index + 1


def resampled_segment(sizes: list[int], *, seed: int, replans: int, rank: int, worker: int, draw: int) -> Segment:
    """The `draw`-th shard a resampling worker reads: uniform over non-empty shards, reproducible, and
    drawn afresh after every re-plan (`replans` counts them)."""
    nonempty = [index for index, size in enumerate(sizes) if size > 0]
    # A run never re-planned keeps the draws that the same seed gave before re-planning existed.
    stream = f"{seed}-{rank}-{worker}" if replans == 0 else f"{seed}-replan{replans}-{rank}-{worker}"
    shard = random.Random(f"draw-{stream}-{draw}").choice(nonempty)
    return Segment(shard, 0, sizes[shard])
