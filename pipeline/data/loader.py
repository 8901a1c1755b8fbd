"""The streaming loader every stage trains from.

Promises:
- Shards come from local paths, brace patterns and anything webdataset opens; they are streamed,
  never copied whole.
- `mode: epoch` (exactly once): in each epoch every valid sample is yielded exactly once across
  all ranks and workers, every rank yields `steps_per_epoch` batches, and batches a rank could not
  fill are padded with samples whose `valid` flag is False. `mode: resampled`: shards are drawn at
  random with replacement, forever.
- Bad samples are skipped, counted by reason and shard, and logged with rate limiting; past
  `max_bad_fraction` the run stops with DataErrorBudgetExceeded naming the worst shards. A sample
  that would cost more memory or time than `max_member_bytes`, `max_image_pixels` or
  `max_aspect_ratio` allow is bad, and so is each sample a shard lacks of its declared size
  (`sizes.json`, `*_stats.json`): `missing_samples`.
- `state_dict()` records, per worker, the position after the last batch handed out; a loader given
  that state yields exactly the batches an uninterrupted one would have yielded next (same
  shards, world size, batch size, worker count and mode).
- Given the states of every rank of the run that wrote them, a loader also resumes across a
  changed worker count or world size (a changed shard list, sample count, batch size or mode is
  refused). `mode: epoch` re-plans the rest of the epoch: each old worker's run from the start of
  the chunk it was in is unread, and those spans are split over the new ranks and workers as a
  whole epoch would be, so every new rank yields the same number of batches and the epoch still
  yields every valid sample; the samples an old worker had already taken from its chunk are
  yielded again, at most `shuffle_buffer - 1` per old worker (none with a buffer of 0 or 1). The
  next epoch is planned whole. `mode: resampled` draws afresh, seeded by the count of re-plans.
  Counters carry over: old rank r's go to new rank r mod the new world size, so summed over ranks
  they count everything once.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Iterable, Iterator, Literal

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import operational
from pipeline.data.decode import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS
from pipeline.data.plan import WorkerPlan, plan_epoch, steps_per_epoch, unread_spans
from pipeline.data.precomputed import members_of, read_manifest
from pipeline.data.stream import StreamSpec, WorkerState, WorkerStream, check_error_budget
from pipeline.data.tars import MAX_MEMBER_BYTES, expand_shards, shard_size
from pipeline.data.text import make_tokenizer
from pipeline.ranges import Fraction, NonNegativeInt, PositiveInt, Range

log = logging.getLogger("t2i.data")


@dataclass
class DataConfig:
    """Where the image-text shards are and how they become batches."""

    shards: str = ""  # brace pattern(s), '::'-separated; local, pipe:, http(s)
    # precomputed: shards written by a precompute stage (pretokenize, ...), whose manifest declares their members
    kind: Literal["images", "precomputed"] = "images"
    resolution: Annotated[int, Range(8, 4096)] = 64
    crop: Literal["center", "random"] = "center"
    batch_size: PositiveInt = 16  # per rank
    num_workers: NonNegativeInt = operational(2)  # loader processes; a run resumes across a change (module docstring)
    mode: Literal["epoch", "resampled"] = "epoch"
    shuffle_shards: bool = True
    shuffle_buffer: NonNegativeInt = 256  # raw samples permuted together; 0 or 1 keeps tar order
    tokenizer: str | None = None  # 'open_clip:ViT-B-32' or 'hf:/local/path'; None gives no tokens
    text_length: PositiveInt = 77
    # Whether a run stops on bad data, not what it computes: raise it and resume a stopped run.
    max_bad_fraction: Fraction = operational(0.05)
    budget_min_samples: NonNegativeInt = operational(200)  # the budget is judged once this many samples were read
    # Bounds on the memory and time one sample may cost, checked before it is read or decoded; a sample
    # past one is skipped and counted (oversized_member, image_too_large, extreme_aspect_ratio). Like
    # timeouts they protect the run: on sane data they skip nothing.
    max_member_bytes: PositiveInt = operational(MAX_MEMBER_BYTES)  # a tar member's declared size
    max_image_pixels: PositiveInt = operational(MAX_IMAGE_PIXELS)  # pixels to decode
    max_aspect_ratio: Annotated[float, Range(1)] = operational(MAX_ASPECT_RATIO)  # longer side / shorter side


class StreamingLoader:
    """Batches for one rank: dicts with `caption`, `key`, `valid` and, from image shards, `image`
    (B, 3, R, R) in [-1, 1] and, with a tokenizer, `tokens` (B, text_length); from precomputed shards,
    each member their manifest declares (integers as int64, floats as float32). Iterating runs epoch
    after epoch."""

    def __init__(self, cfg: DataConfig, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 enforce_budget: bool = True) -> None:
        self.cfg, self.seed, self.rank, self.world_size = cfg, seed, rank, world_size
        self.enforce_budget = enforce_budget
        self.urls = expand_shards(cfg.shards)
        with ThreadPoolExecutor(8) as pool:
            sizes = list(pool.map(shard_size, self.urls))
        self.sizes = [size for size, _ in sizes]
        # Damage found while counting; a worker reads only the samples counted, so it is not seen twice.
        self.problems = {url: problem for url, (_, problem) in zip(self.urls, sizes) if problem}
        if sum(self.sizes) == 0:
            raise ValueError(f"data.shards={cfg.shards!r}: no samples in {len(self.urls)} shard(s)"
                             f" ({len(self.problems)} missing or damaged)")
        self.members = members_of(read_manifest(cfg.shards)) if cfg.kind == "precomputed" else None
        self.workers = max(1, cfg.num_workers)
        self.epoch, self.consumed, self.replans = 0, 0, 0
        self._spans = self._whole_epoch()  # what the current epoch reads, in laid-out positions
        self._worker_states: dict[int, dict] = {}
        self._finished = WorkerState()  # counters of completed epochs and of the ranks before a re-plan

    @property
    def steps_per_epoch(self) -> int | None:
        """Batches per epoch on every rank (in a re-planned epoch, those after the re-plan); None in
        resampled mode."""
        if self.cfg.mode == "resampled":
            return None
        return steps_per_epoch(self._spans, self.world_size, self.cfg.batch_size)

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield from self.epoch_batches()
            self._finish_epoch()

    def epoch_batches(self) -> Iterator[dict]:
        """The remaining batches of the current epoch (endless in resampled mode)."""
        cfg = self.cfg
        if cfg.mode == "resampled":
            plans = [WorkerPlan(worker, None, None) for worker in range(self.workers)]
        else:
            plans = plan_epoch(self.sizes, self._spans, epoch=self.epoch, seed=self.seed, rank=self.rank,
                               world_size=self.world_size, batch_size=cfg.batch_size,
                               workers=self.workers, shuffle_shards=cfg.shuffle_shards)
        spec = StreamSpec(tuple(self.urls), tuple(self.sizes), cfg.resolution, cfg.crop, cfg.batch_size,
                          cfg.shuffle_buffer, self.seed, self.epoch, self.rank, cfg.max_bad_fraction,
                          cfg.budget_min_samples if self.enforce_budget else 2**62, cfg.max_member_bytes,
                          cfg.max_image_pixels, cfg.max_aspect_ratio, self.members, self.replans)
        states = {worker: WorkerState(**self._worker_states.get(worker, {})) for worker in range(self.workers)}
        dataset = _EpochDataset(spec, plans, states, rotation=self.consumed % self.workers,
                                tokenizer=cfg.tokenizer, text_length=cfg.text_length)
        # Its own generator: making an iterator must not draw from the global RNG the model uses.
        loader = DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers,
                            worker_init_fn=_worker_init if cfg.num_workers else None,
                            generator=torch.Generator().manual_seed(self.seed))
        for batch in loader:
            state = batch.pop("_state")
            self._worker_states[state.pop("worker")] = state
            self.consumed += 1
            if self.enforce_budget:
                totals = self.totals()
                check_error_budget(totals["samples"], totals["skipped"], totals["bad_shards"],
                                   cfg.max_bad_fraction, cfg.budget_min_samples)
            yield batch

    def _finish_epoch(self) -> None:
        self._finished = self._counters()
        self.epoch, self.consumed, self._worker_states = self.epoch + 1, 0, {}
        self._spans = self._whole_epoch()

    def _counters(self) -> WorkerState:
        return _sum_counters([self._finished.as_dict(), *self._worker_states.values()])

    def totals(self) -> dict:
        """Samples yielded, skips by reason (damaged shards included), skips by shard, padding."""
        total = self._counters()
        for url, problem in self.problems.items():
            total.skipped[problem] = total.skipped.get(problem, 0) + 1
            total.bad_shards[url] = total.bad_shards.get(url, 0) + 1
        return {"samples": total.samples, "skipped": total.skipped, "bad_shards": total.bad_shards,
                "padded": total.padded}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed,
                "workers": {str(worker): state for worker, state in self._worker_states.items()},
                "finished": self._finished.as_dict(), "layout": self._layout(),
                "spans": [list(span) for span in self._spans], "replans": self.replans}

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Resumes from this rank's state, or from the list of the states of every rank of the run
        that wrote the checkpoint (index = its rank). With the same layout it continues exactly; with
        another worker count or world size, given every rank's state, it re-plans (module docstring).
        Raises ValueError naming what changed when the shards, the sample count, the batch size or
        the mode differ, or when a re-plan lacks some rank's state."""
        # Checkpoints written before re-planning existed: a whole epoch, never re-planned.
        states = [{"spans": self._whole_epoch(), "replans": 0, **one}
                  for one in (state if isinstance(state, list) else [state])]
        old, new = states[0]["layout"], self._layout()
        changed = {key: (old[key], new[key]) for key in new if old[key] != new[key]}
        refused = [key for key in changed if key not in ("world_size", "workers")]
        if refused:
            raise ValueError(f"cannot resume the data position: {_describe(changed, refused)} changed since the "
                             "checkpoint")
        if not changed:
            self._restore(states[0] if isinstance(state, dict) else states[self.rank])
        elif len(states) != old["world_size"] or any(one["epoch"] != states[0]["epoch"] for one in states):
            raise ValueError(f"cannot resume the data position: {_describe(changed, changed)} changed since the "
                             f"checkpoint, and re-planning needs the states of all {old['world_size']} ranks of "
                             f"one checkpoint (got {len(states)})")
        else:
            self._replan(states, _describe(changed, changed))

    def same_layout(self, state: dict) -> bool:
        """Whether one rank's `state` was written with this loader's layout, so that it alone resumes it."""
        return state["layout"] == self._layout()

    def _restore(self, state: dict) -> None:
        self.epoch, self.consumed, self.replans = state["epoch"], state["consumed"], state["replans"]
        self._worker_states = {int(worker): dict(value) for worker, value in state["workers"].items()}
        self._finished = WorkerState(**state["finished"])
        self._spans = [tuple(span) for span in state["spans"]]

    def _replan(self, states: list[dict], what: str) -> None:
        """Plans the rest of the epoch (or fresh draws) for this layout from every old rank's state;
        old rank r's counters go to this rank when r % world_size is this rank."""
        cfg = self.cfg
        self.epoch, self.consumed, self._worker_states = states[0]["epoch"], 0, {}
        self.replans = states[0]["replans"] + 1
        self._finished = _sum_counters(counts for rank, state in enumerate(states)
                                       if rank % self.world_size == self.rank
                                       for counts in [state["finished"], *state["workers"].values()])
        if cfg.mode == "resampled":
            log.info("data: re-planned for %s; resampled draws start afresh (re-plan %d)", what, self.replans)
            return
        positions = [{int(worker): (value["segment"], value["offset"]) for worker, value in state["workers"].items()}
                     for state in states]
        self._spans = unread_spans(self.sizes, [tuple(span) for span in states[0]["spans"]], positions,
                                   epoch=self.epoch, seed=self.seed, batch_size=cfg.batch_size,
                                   workers=states[0]["layout"]["workers"], shuffle_shards=cfg.shuffle_shards)
        log.info("data: re-planned the rest of epoch %d for %s: %d of %d samples remain", self.epoch, what,
                 sum(stop - start for start, stop in self._spans), sum(self.sizes))

    def _whole_epoch(self) -> list[tuple[int, int]]:
        return [(0, sum(self.sizes))]

    def _layout(self) -> dict:
        return {"shards": len(self.urls), "samples": sum(self.sizes), "world_size": self.world_size,
                "batch_size": self.cfg.batch_size, "workers": self.workers, "mode": self.cfg.mode}


def _describe(changed: dict[str, tuple], keys: Iterable[str]) -> str:
    return ", ".join(f"{key} {changed[key][0]!r} -> {changed[key][1]!r}" for key in keys)


def _sum_counters(states: Iterable[dict]) -> WorkerState:
    """Samples, padding and skips (by reason and by shard) added up over WorkerState dicts."""
    total = WorkerState()
    for state in states:
        total.samples += state["samples"]
        total.padded += state["padded"]
        for reason, count in state["skipped"].items():
            total.skipped[reason] = total.skipped.get(reason, 0) + count
        for url, count in state["bad_shards"].items():
            total.bad_shards[url] = total.bad_shards.get(url, 0) + count
    return total


# How long a loader worker goes on serving after SIGTERM: SLURM (scancel, requeue, preemption) and
# `kill -TERM -PGID` signal every process of a job, these workers too, while the main process
# needs them until it has checkpointed at its next step boundary. A stuck worker still ends.
WORKER_SIGNAL_GRACE_S = 120


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode in parallel processes; intra-op threads only contend
    signal.signal(signal.SIGTERM, _leave_later)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # SLURM's time-limit warning is for the main process


def _leave_later(signum: int, frame) -> None:
    timer = threading.Timer(WORKER_SIGNAL_GRACE_S, os._exit, (1,))
    timer.daemon = True
    timer.start()


class _EpochDataset(IterableDataset):
    """Runs, in each DataLoader worker slot, the logical worker whose batch comes next."""

    def __init__(self, spec: StreamSpec, plans: list[WorkerPlan], states: dict[int, WorkerState], *,
                 rotation: int, tokenizer: str | None, text_length: int) -> None:
        self.spec, self.plans, self.states, self.rotation = spec, plans, states, rotation
        self.tokenizer, self.text_length = tokenizer, text_length

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        slot = info.id if info else 0
        # The DataLoader asks its workers in turn starting at slot 0; the logical worker owning the
        # next batch must sit there for a resumed epoch to keep the uninterrupted order.
        worker = (slot + self.rotation) % len(self.plans)
        tokenize = make_tokenizer(self.tokenizer, self.text_length) if self.tokenizer else None
        stream = WorkerStream(self.spec, self.plans[worker], self.states[worker], tokenize)
        yield from stream.batches()
