"""The precompute machinery: image-text shards -> precomputed shards (pipeline/data/precomputed.py),
by any `Encoder` that declares its members.

Each input shard `NAME.tar` becomes `OUT/NAME.tar` and `OUT/NAME_stats.json` (samples written,
samples skipped by reason, per-member statistics and what made the values), the stats file written
last: a shard whose stats file names the same producer and members is finished, and a re-run skips
it; one made otherwise (other weights, another tokenizer) is made again. A source shard that cannot
be opened gets no output (perhaps a passing failure: a re-run retries it) and fails the run once the
others are done. Ranks (torchrun, any number of nodes) take disjoint shards: shard i goes to rank
i % world_size. Rank 0 finally writes `manifest.json`.

Loader workers decode the images and tokenize the captions while the main process encodes; one
thread writes the tars, in order, at most two batches behind the encoder.

A precompute stage's config extends `PrecomputeConfig` with the run its encoder loads, and its
`run` is `run_precompute(cfg, make_encoder)`. An encoder may derive facts from the statistics of
all its values once every shard is written (`derived_info`, e.g. a latent scale factor); they join
its `info` in the manifest.
"""
from __future__ import annotations

import json
import os
import random
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
import webdataset
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from pipeline.config import operational
from pipeline.data.precomputed import MANIFEST, Member, sample_members
from pipeline.data.samples import collate, image_sample
from pipeline.data.tars import Skip, expand_shards, is_local, iter_raw_samples, local_path, whole_second_mtime
from pipeline.data.text import check_tokenizer, make_tokenizer
from pipeline.engine.distributed import DistInfo, barrier, free_cores, setup, teardown
from pipeline.files import write_json
from pipeline.launch.config import LaunchConfig, launch_field
from pipeline.ranges import NonNegativeInt, PositiveInt


@dataclass
class PrecomputeConfig:
    """What every precompute stage's config holds; a stage adds the run its encoder loads."""

    out_dir: str = ""
    shards: str = ""  # the image-text shards: pattern, folder or '::'-joined list
    tokenizer: str = "open_clip:ViT-B-32"
    text_length: PositiveInt = 32
    batch_size: PositiveInt = operational(64)  # images encoded at once: the values do not depend on it
    num_workers: NonNegativeInt = operational(2)
    # The encoder's torch threads on CPU; 0: all of this process's cores. The loader workers only
    # decode and tokenize, a small part of a core beside the encoder, and sleep once their queue is full.
    cpu_threads: NonNegativeInt = operational(0)
    launch: LaunchConfig = launch_field()

    def validate(self) -> None:
        for key in ("out_dir", "shards"):
            if not getattr(self, key):
                raise ValueError(f"{key} is required")
        check_tokenizer(self.tokenizer)


class Encoder(Protocol):
    """What the machinery asks of an encoder. `encode` runs in the main process, on its device."""

    members: dict[str, Member]  # what each sample holds besides its caption
    producer: dict  # what makes the values (weights_sha256, stage, run, tokenizer, ...): shards made otherwise are made again
    info: dict  # facts about the values that consumers need, for the manifest
    resolution: int  # images are decoded at this side, centre-cropped
    tokenizer: str | None  # captions are tokenized in the loader workers into batch["text_tokens"]
    text_length: int

    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        """A batch (image (B, 3, R, R) in [-1, 1], caption, key, text_tokens) -> each member (B, *shape)."""
        ...


def run_precompute(cfg: PrecomputeConfig, make_encoder: Callable[[torch.device], Encoder]) -> int:
    """A precompute stage's `run`: this process's share of the shards (torchrun: any number of
    ranks and nodes), encoded by `make_encoder(device)`."""
    dist = setup("accelerate", timeout_s=3600)
    try:
        torch.set_num_threads(cfg.cpu_threads or free_cores(0))
        precompute(make_encoder(dist.device), cfg.shards, cfg.out_dir, batch_size=cfg.batch_size,
                   num_workers=cfg.num_workers, dist=dist)
    finally:
        teardown()
    return 0


def precompute(encoder: Encoder, shards: str, out_dir: str | Path, *, batch_size: int, num_workers: int,
               dist: DistInfo) -> None:
    """Writes this rank's unfinished shards, then (rank 0, after every rank) the manifest."""
    for name, member in encoder.members.items():
        member.check_declared(name)  # before any work
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    urls = expand_shards(shards)
    names = [Path(url).name for url in urls]
    if len(set(names)) != len(names):
        raise ValueError(f"shards={shards!r}: shard file names must be unique, they name the outputs")
    if any(Path(local_path(url)).parent.resolve() == out.resolve() for url in urls if is_local(url)):
        raise ValueError(f"out_dir={str(out_dir)!r} holds the source shards, which the outputs would replace: "
                         "write them to another folder")
    made_by = {"producer": encoder.producer, "members": {name: member.as_dict() for name, member in encoder.members.items()}}
    mine = [(index, url) for index, url in enumerate(urls)
            if index % dist.world_size == dist.rank and not _finished(out, names[index], made_by)]
    dataset = _ShardBatches(mine, encoder.resolution, batch_size, encoder.tokenizer, encoder.text_length)
    loader = DataLoader(dataset, batch_size=None, num_workers=min(num_workers, len(mine)))
    open_shards: dict[int, _OutputShard] = {}
    unreadable: list[str] = []
    progress = tqdm(total=len(mine), desc=f"precompute rank {dist.rank}", unit="shard", disable=not mine)
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending: deque[Future] = deque()
        for index, batch, skipped in loader:
            if index not in open_shards:
                open_shards[index] = _OutputShard(out, names[index], urls[index], made_by, encoder.members)
            shard = open_shards[index]
            if batch is not None:
                values = {name: value.cpu() for name, value in encoder.encode(batch).items()}
                for name, member in encoder.members.items():
                    member.check_values(name, values[name])  # before anything of the batch is written
                pending.append(writer.submit(shard.write, batch["key"], batch["caption"], values))
            if skipped is not None:  # the shard's last batch
                del open_shards[index]
                if "missing_shard" in skipped:  # perhaps a passing failure: no output, so a re-run retries it
                    pending.append(writer.submit(shard.discard))
                    unreadable.append(urls[index])
                else:
                    pending.append(writer.submit(shard.finish, skipped))
                    pending[-1].add_done_callback(lambda _: progress.update(1))
            while len(pending) > 2 or (pending and pending[0].done()):
                pending.popleft().result()  # a write's error stops the run here
        for future in pending:
            future.result()
    progress.close()
    if unreadable:
        raise FileNotFoundError(f"precompute rank {dist.rank}: {len(unreadable)} shard(s) could not be opened: "
                                f"{', '.join(unreadable)}; the others are finished; run again to retry these")
    barrier()
    if dist.is_main:
        _write_manifest(out, urls, names, encoder)


class _ShardBatches(IterableDataset):
    """(shard index, batch or None, skips) for the given shards, whole shards per loader worker; skips
    (reason -> count) is None except on a shard's last batch. Batches carry their captions' tokens
    (`text_tokens`) when there is a tokenizer: tokenizing, like decoding, happens in the workers."""

    def __init__(self, urls: list[tuple[int, str]], resolution: int, batch_size: int, tokenizer: str | None,
                 text_length: int) -> None:
        self.urls, self.resolution, self.batch_size = urls, resolution, batch_size
        self.tokenizer, self.text_length = tokenizer, text_length

    def __iter__(self) -> Iterator[tuple[int, dict | None, dict | None]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        urls = self.urls[worker::workers]
        if not urls:
            return
        tokenize = make_tokenizer(self.tokenizer, self.text_length) if self.tokenizer else None

        def batched(samples: list[dict]) -> dict:
            batch = collate(samples)
            return {**batch, "text_tokens": tokenize(batch["caption"])} if tokenize else batch

        for index, url in urls:
            samples, skipped = [], {}
            for item in iter_raw_samples(url):
                sample = item if isinstance(item, Skip) else image_sample(item, self.resolution, "center", random.Random(0))
                if isinstance(sample, Skip):
                    skipped[sample.reason] = skipped.get(sample.reason, 0) + 1
                    continue
                samples.append(sample)
                if len(samples) == self.batch_size:
                    yield index, batched(samples), None
                    samples = []
            yield index, batched(samples) if samples else None, skipped  # the shard's last batch


class _OutputShard:
    """One output shard, written under a temporary name and renamed when complete; its stats file,
    written last, marks it finished and says what made it (`made_by`)."""

    def __init__(self, out: Path, name: str, source: str, made_by: dict, members: dict[str, Member]) -> None:
        self.out, self.name, self.source, self.made_by, self.members = out, name, source, made_by, members
        self.count = 0
        self.moments = {name: [0, 0.0, 0.0] for name, member in members.items() if member.dtype.startswith("float")}
        self.tar = webdataset.TarWriter(str(_temporary(out, name)), mtime=whole_second_mtime())

    def write(self, keys: list[str], captions: list[str], values: dict[str, torch.Tensor]) -> None:
        for row, (key, caption) in enumerate(zip(keys, captions)):
            self.tar.write({"__key__": key, **sample_members(caption, {name: value[row] for name, value in values.items()},
                                                             self.members)})
        for name, moments in self.moments.items():
            stored = values[name].to(getattr(torch, self.members[name].dtype)).double()  # what the shard holds
            moments[0] += stored.numel()
            moments[1] += float(stored.sum())
            moments[2] += float(stored.square().sum())
        self.count += len(keys)

    def finish(self, skipped: dict) -> None:
        self.tar.close()
        os.replace(_temporary(self.out, self.name), self.out / self.name)
        write_json(_stats_path(self.out, self.name), {
            "successes": self.count, "skipped": skipped, "source": self.source, "made_by": self.made_by,
            "moments": {name: dict(zip(("count", "sum", "sum_of_squares"), moments)) for name, moments in self.moments.items()}})

    def discard(self) -> None:
        self.tar.close()
        _temporary(self.out, self.name).unlink()


def _finished(out: Path, name: str, made_by: dict) -> bool:
    path = _stats_path(out, name)
    return path.exists() and json.loads(path.read_text()).get("made_by") == made_by


def _write_manifest(out: Path, urls: list[str], names: list[str], encoder: Encoder) -> None:
    stats = {name: json.loads(_stats_path(out, name).read_text()) for name in names}
    write_json(out / "sizes.json", {name: entry["successes"] for name, entry in stats.items()})
    statistics = _statistics(stats.values())
    derived = encoder.derived_info(statistics) if callable(getattr(encoder, "derived_info", None)) else {}
    write_json(out / MANIFEST, {
        "members": {name: member.as_dict() for name, member in encoder.members.items()},
        "producer": encoder.producer, "info": {**encoder.info, **derived}, "statistics": statistics,
        "source_shards": urls, "samples": {name: entry["successes"] for name, entry in stats.items()},
        "skipped": {name: entry["skipped"] for name, entry in stats.items() if entry["skipped"]}})


def _statistics(stats) -> dict[str, dict[str, float]]:
    """Per float member, the count, mean and standard deviation of all values in all shards."""
    totals: dict[str, list[float]] = {}
    for entry in stats:
        for name, moments in entry.get("moments", {}).items():
            total = totals.setdefault(name, [0, 0.0, 0.0])
            for i, key in enumerate(("count", "sum", "sum_of_squares")):
                total[i] += moments[key]
    out = {}
    for name, (count, total, squares) in totals.items():
        mean = total / max(count, 1)
        out[name] = {"count": count, "mean": mean, "std": max(squares / max(count, 1) - mean ** 2, 0.0) ** 0.5}
    return out


def _stats_path(out: Path, name: str) -> Path:
    return out / (name.rsplit(".", 1)[0] + "_stats.json")


def _temporary(out: Path, name: str) -> Path:
    return out / f".{name}.tmp"

