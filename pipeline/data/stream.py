"""One loader worker's stream: raw samples -> block shuffle -> decode -> batches, with its position.

The worker reads its plan's segments in chunks of `shuffle_buffer` raw samples, permutes each chunk
with a seed derived from where the chunk starts, and decodes the samples in that order. Its
position is (segment, offset of the chunk start, samples taken from the chunk): enough to rebuild
the same chunk and continue with the next unseen sample. Every batch carries the worker's position
and counters as of that batch, so the consumer's state never runs ahead of what it has used.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from pipeline.data.plan import Segment, WorkerPlan, resampled_segment
from pipeline.data.precomputed import Member, precomputed_sample
from pipeline.data.samples import collate, image_sample
from pipeline.data.tars import RawSample, Skip, iter_raw_samples

log = logging.getLogger("t2i.data")


@dataclass
class WorkerState:
    """Where a worker is and what it has seen; plain data so it checkpoints as JSON."""

    segment: int = 0
    offset: int = 0
    taken: int = 0
    batches: int = 0
    samples: int = 0
    padded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    bad_shards: dict[str, int] = field(default_factory=dict)

    def count_skip(self, skip: Skip) -> None:
        self.skipped[skip.reason] = self.skipped.get(skip.reason, 0) + skip.count
        self.bad_shards[skip.shard] = self.bad_shards.get(skip.shard, 0) + skip.count
        _warn_rate_limited(skip)

    def as_dict(self) -> dict:
        return {key: (dict(value) if isinstance(value, dict) else value) for key, value in vars(self).items()}


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs besides its plan; picklable for DataLoader workers."""

    urls: tuple[str, ...]
    sizes: tuple[int, ...]
    resolution: int
    crop: str
    batch_size: int
    shuffle_buffer: int
    seed: int
    epoch: int
    rank: int
    max_bad_fraction: float
    budget_min_samples: int
    max_member_bytes: int
    max_image_pixels: int
    max_aspect_ratio: float
    members: dict[str, Member] | None = None  # precomputed shards' members (None: image shards)
    replans: int = 0  # times the run was re-planned for a new layout; resampled draws depend on it


class WorkerStream:
    """Batches of one logical worker, starting from `state`."""

    def __init__(self, spec: StreamSpec, plan: WorkerPlan, state: WorkerState,
                 tokenize: Callable[[list[str]], torch.Tensor] | None) -> None:
        self.spec, self.plan, self.state, self.tokenize = spec, plan, state, tokenize
        self._open: tuple[int, int, Iterator] | None = None  # (segment, offset, raw iterator) kept across chunks
        self._recent_keys: dict[int, tuple[int, set[str]]] = {}  # segment -> (shard, keys)

    def batches(self) -> Iterator[dict]:
        spec, state, plan = self.spec, self.state, self.plan
        samples: list[dict] = []
        last_valid: dict | None = None
        chunks = self._chunks()
        while plan.batches is None or state.batches < plan.batches:
            sample = next(chunks, None)
            if sample is None:  # segments exhausted: pad the remaining batches
                if last_valid is None:
                    last_valid = self._blank()
                samples.append({**last_valid, "valid": False})
                state.padded += 1
            else:
                samples.append(sample)
                last_valid = sample
                state.samples += 1
            if len(samples) == spec.batch_size:
                state.batches += 1
                yield self._collate(samples)
                samples = []

    def _chunks(self) -> Iterator[dict]:
        """Decoded samples in shuffled order, advancing the position as each raw sample is taken."""
        state, spec = self.state, self.spec
        while True:
            reload = state.taken > 0  # this chunk was loaded before a restart: its shortfalls are counted
            items, shortfalls, following = self._read_chunk(state.segment, state.offset)
            if not reload:
                for shortfall in shortfalls:
                    state.count_skip(shortfall)
                check_error_budget(state.samples, state.skipped, state.bad_shards,
                                   spec.max_bad_fraction, spec.budget_min_samples)
            if not items:  # the plan is read; its shortfalls, counted, must not count again on resume
                state.segment, state.offset = following
                return
            order = list(range(len(items)))
            if spec.shuffle_buffer > 1:
                random.Random(f"chunk-{spec.seed}-{spec.epoch}-{spec.rank}-{self.plan.worker}-"
                              f"{state.segment}-{state.offset}").shuffle(order)
            for position in order[state.taken:]:
                state.taken += 1
                if state.taken == len(items):
                    state.segment, state.offset, state.taken = following[0], following[1], 0
                sample = self._decode(items[position])
                if isinstance(sample, Skip):
                    state.count_skip(sample)
                    check_error_budget(state.samples, state.skipped, state.bad_shards,
                                       spec.max_bad_fraction, spec.budget_min_samples)
                else:
                    yield sample

    def _segment(self, index: int) -> Segment | None:
        if self.plan.segments is None:
            return resampled_segment(list(self.spec.sizes), seed=self.spec.seed, replans=self.spec.replans,
                                     rank=self.spec.rank, worker=self.plan.worker, draw=index)
        return self.plan.segments[index] if index < len(self.plan.segments) else None

    def _read_chunk(self, segment: int, offset: int) -> tuple[list, list[Skip], tuple[int, int]]:
        """Up to `shuffle_buffer` raw samples (or Skips standing for them) from (segment, offset) on,
        the shortfalls of segments whose shard ended before their planned stop (Skip
        'missing_samples', so that the samples a damaged shard or an overstated size loses count as
        bad), and the position after the chunk."""
        size = max(1, self.spec.shuffle_buffer)
        items: list[RawSample | Skip] = []
        shortfalls: list[Skip] = []
        while len(items) < size:
            piece = self._segment(segment)
            if piece is None:
                break
            url = self.spec.urls[piece.shard]
            remaining = piece.stop - piece.start - offset
            raw = self._raw_iterator(segment, offset, url, piece.start + offset)
            taken = 0
            while taken < remaining and len(items) < size:
                item = next(raw, None)
                if item is None:
                    break
                items.append(item if isinstance(item, Skip) else self._check_duplicate(segment, piece.shard, item))
                taken += 1
            if taken < remaining and len(items) < size:  # the shard ended early
                shortfalls.append(Skip("missing_samples", url, detail=f"{remaining - taken} sample(s) fewer than "
                                       "its declared size", count=remaining - taken))
            if taken == remaining or len(items) < size:  # segment done, or its shard ended early
                segment, offset, self._open = segment + 1, 0, None
            else:
                offset += taken
                self._open = (segment, offset, raw)
        return items, shortfalls, (segment, offset)

    def _raw_iterator(self, segment: int, offset: int, url: str, skip: int) -> Iterator:
        if self._open is not None and self._open[:2] == (segment, offset):
            return self._open[2]
        return iter_raw_samples(url, skip=skip, max_member_bytes=self.spec.max_member_bytes)

    def _check_duplicate(self, segment: int, shard: int, item: RawSample) -> RawSample | Skip:
        """A key seen before in this segment, or in the previous one when that was another shard
        (a duplicate across a tar boundary)."""
        if segment not in self._recent_keys:
            previous = list(self._recent_keys.items())[-1:]
            self._recent_keys = dict(previous)
            self._recent_keys[segment] = (shard, set())
        for other, (other_shard, keys) in self._recent_keys.items():
            if item.key in keys and (other == segment or other_shard != shard):
                return Skip("duplicate_key", item.shard, item.key)
        self._recent_keys[segment][1].add(item.key)
        return item

    def _decode(self, item: RawSample | Skip) -> dict | Skip:
        if isinstance(item, Skip):
            return item
        if self.spec.members is not None:
            return precomputed_sample(item, self.spec.members)
        rng = random.Random(f"crop-{self.spec.seed}-{self.spec.epoch}-{item.key}")
        return image_sample(item, self.spec.resolution, self.spec.crop, rng, self.spec.max_image_pixels,
                            self.spec.max_aspect_ratio)

    def _blank(self) -> dict:
        if self.spec.members is not None:
            raise RuntimeError(f"loader worker {self.plan.worker} found no readable precomputed sample to pad its batches with")
        resolution = self.spec.resolution
        return {"image": torch.zeros(3, resolution, resolution), "caption": "", "key": "", "valid": False}

    def _collate(self, samples: list[dict]) -> dict:
        batch = collate(samples)
        batch["_state"] = {"worker": self.plan.worker, **self.state.as_dict()}
        if self.tokenize is not None:
            batch["tokens"] = self.tokenize(batch["caption"])
        return batch


class DataErrorBudgetExceeded(RuntimeError):
    """Too large a share of the samples read so far was bad."""


def check_error_budget(samples: int, skipped: dict[str, int], bad_shards: dict[str, int],
                       max_bad_fraction: float, min_seen: int) -> None:
    """Raises DataErrorBudgetExceeded, naming the reasons and the worst shards, once at least
    `min_seen` samples were read and more than `max_bad_fraction` of them were skipped."""
    bad = sum(skipped.values())
    seen = samples + bad
    if seen < min_seen or bad <= max_bad_fraction * seen:
        return
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items(), key=lambda kv: -kv[1]))
    worst = sorted(bad_shards.items(), key=lambda kv: -kv[1])[:5]
    shards = ", ".join(f"{url} ({count})" for url, count in worst)
    raise DataErrorBudgetExceeded(
        f"data error budget exceeded: {bad} of {seen} samples skipped ({bad / seen:.1%} > "
        f"data.max_bad_fraction {max_bad_fraction:.1%}); reasons: {reasons}; worst shards: {shards}")


_last_warning: dict[str, tuple[float, int]] = {}


def _warn_rate_limited(skip: Skip, interval: float = 10.0) -> None:
    """Logs a skipped sample: the first few of each reason, then at most one line per interval."""
    now = time.monotonic()
    last, suppressed = _last_warning.get(skip.reason, (0.0, 0))
    if now - last < interval and last:
        _last_warning[skip.reason] = (last, suppressed + 1)
        return
    more = f" ({suppressed} more since the last message)" if suppressed else ""
    log.warning("skipped %s in %s%s%s%s", skip.reason, skip.shard, f" key {skip.key}" if skip.key else "",
                f": {skip.detail[:120]}" if skip.detail else "", more)
    _last_warning[skip.reason] = (now, 0)
