"""The `pretokenize` stage: image-text shards -> token shards, with a trained discrete autoencoder
(`autoencoder_stage`: dvae, vqvae or vqvae2).

Each input shard `NAME.tar` becomes `OUT/NAME.tar` holding, per sample, `KEY.txt` (the caption),
`KEY.text.npy` (caption tokens) and `KEY.image.npy` (the autoencoder's codes, flattened in raster
order; VQ-VAE-2's top grid then its bottom grid), both uint16, plus
`OUT/NAME_stats.json` (samples written, samples skipped by reason, what made the tokens), written
last: a shard whose stats file names the same autoencoder weights and tokenizer is finished, and a
re-run skips it; one made otherwise is made again. A source shard that cannot be opened gets no
output (perhaps a passing failure: a re-run retries it) and fails the stage once the others are
done. Ranks (torchrun, any number of nodes) take disjoint shards: shard i goes to rank
i % world_size. Rank 0 finally writes `manifest.json`: the source shards, the sample counts, the
code grids' sides and the sha256 of the weights that made the codes.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import webdataset
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from pipeline.config import operational
from pipeline.data.samples import TOKEN_ID_LIMIT, collate, image_sample, token_members
from pipeline.data.tars import Skip, expand_shards, iter_raw_samples, whole_second_mtime
from pipeline.data.text import check_tokenizer, make_tokenizer, portable
from pipeline.engine.distributed import barrier, free_cores, setup, teardown
from pipeline.launch.config import LaunchConfig, launch_field
from pipeline.runs import load_run

OUTPUT = "out_dir"
MANIFEST = "manifest.json"
CODE_STAGES = ("dvae", "vqvae", "vqvae2")


@dataclass
class Config:
    out_dir: str = ""
    shards: str = ""  # the image-text shards: pattern, folder or '::'-joined list
    autoencoder: str = ""  # the output folder of a trained dvae, vqvae or vqvae2 stage
    autoencoder_stage: str = "dvae"  # which of those stages made it
    tokenizer: str = "open_clip:ViT-B-32"
    text_length: int = 32
    batch_size: int = operational(64)  # images encoded at once: the codes do not depend on it
    num_workers: int = operational(2)
    # The encoder's torch threads on CPU; 0: all of this process's cores. The loader workers only
    # decode and tokenize, a small part of a core beside the encoder, and sleep once their queue is full.
    cpu_threads: int = operational(0)
    launch: LaunchConfig = launch_field()

    def validate(self) -> None:
        for key in ("out_dir", "shards", "autoencoder"):
            if not getattr(self, key):
                raise ValueError(f"{key} is required")
        if self.autoencoder_stage not in CODE_STAGES:
            raise ValueError(f"autoencoder_stage must be one of {', '.join(CODE_STAGES)}, got {self.autoencoder_stage!r}")
        check_tokenizer(self.tokenizer)


class _ShardBatches(IterableDataset):
    """(shard index, batch or None, skips) for this rank's unfinished shards, whole shards per loader
    worker; skips (reason -> count) is None except on a shard's last batch. Batches carry their
    captions' tokens (`text_tokens`): tokenizing, like decoding, happens in the loader workers, which
    overlap it with the encoder's work in the main process."""

    def __init__(self, urls: list[tuple[int, str]], resolution: int, batch_size: int, tokenizer: str,
                 text_length: int) -> None:
        self.urls, self.resolution, self.batch_size = urls, resolution, batch_size
        self.tokenizer, self.text_length = tokenizer, text_length

    def __iter__(self) -> Iterator[tuple[int, dict | None, dict | None]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        urls = self.urls[worker::workers]
        if not urls:
            return
        tokenize = make_tokenizer(self.tokenizer, self.text_length)

        def tokenized(samples: list[dict]) -> dict:
            batch = collate(samples)
            tokens = tokenize(batch["caption"])
            if tokens.max() >= TOKEN_ID_LIMIT:
                raise ValueError(f"tokenizer={self.tokenizer!r} gave token id {int(tokens.max())}: token shards store "
                                 f"ids as uint16, so the tokenizer may have at most {TOKEN_ID_LIMIT} tokens")
            return {**batch, "text_tokens": tokens}

        for index, url in urls:
            samples, skipped = [], {}
            for item in iter_raw_samples(url):
                sample = item if isinstance(item, Skip) else image_sample(item, self.resolution, "center", random.Random(0))
                if isinstance(sample, Skip):
                    skipped[sample.reason] = skipped.get(sample.reason, 0) + 1
                    continue
                samples.append(sample)
                if len(samples) == self.batch_size:
                    yield index, tokenized(samples), None
                    samples = []
            yield index, tokenized(samples) if samples else None, skipped  # the shard's last batch


def run(cfg: Config) -> int:
    dist = setup("accelerate", timeout_s=3600)
    try:
        _pretokenize(cfg, dist)
    finally:
        teardown()
    return 0


def _pretokenize(cfg: Config, dist) -> None:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trained = load_run(cfg.autoencoder, cfg.autoencoder_stage)
    model, model_cfg, weights_hash = trained.model, trained.cfg, trained.weights_sha256
    if model_cfg.model.codebook_size > TOKEN_ID_LIMIT:
        raise ValueError(f"autoencoder={cfg.autoencoder!r} has codebook_size {model_cfg.model.codebook_size}: token "
                         f"shards store codes as uint16, so at most {TOKEN_ID_LIMIT} codes")
    model.to(dist.device, memory_format=torch.channels_last)  # faster convolutions
    resolution = model_cfg.data.resolution
    torch.set_num_threads(cfg.cpu_threads or free_cores(0))
    urls = expand_shards(cfg.shards)
    names = [Path(url).name for url in urls]
    if len(set(names)) != len(names):
        raise ValueError(f"shards={cfg.shards!r}: shard file names must be unique, they name the outputs")
    made_by = {"autoencoder_sha256": weights_hash, "tokenizer": portable(cfg.tokenizer), "text_length": cfg.text_length}
    mine = [(index, url) for index, url in enumerate(urls)
            if index % dist.world_size == dist.rank and not _finished(out, names[index], made_by)]
    dataset = _ShardBatches(mine, resolution, cfg.batch_size, cfg.tokenizer, cfg.text_length)
    loader = DataLoader(dataset, batch_size=None, num_workers=min(cfg.num_workers, len(mine)))
    shards: dict[int, _TokenShard] = {}
    unreadable: list[str] = []
    progress = tqdm(total=len(mine), desc=f"pretokenize rank {dist.rank}", unit="shard", disable=not mine)
    # One thread writes the tars, in submission order, while the encoder works on the next batch.
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending: deque[Future] = deque()
        for index, batch, skipped in loader:
            if index not in shards:
                shards[index] = _TokenShard(out, names[index], urls[index], made_by)
            shard = shards[index]
            if batch is not None:
                codes = encode(model, batch["image"].to(dist.device, memory_format=torch.channels_last))  # (B, codes per image)
                pending.append(writer.submit(shard.write, batch, codes.cpu()))
            if skipped is not None:  # the shard's last batch
                del shards[index]
                if "missing_shard" in skipped:  # perhaps a passing failure: no output, so a re-run retries it
                    pending.append(writer.submit(shard.discard))
                    unreadable.append(urls[index])
                else:
                    pending.append(writer.submit(shard.finish, skipped))
                    pending[-1].add_done_callback(lambda _: progress.update(1))
            while len(pending) > 2 or (pending and pending[0].done()):
                pending.popleft().result()  # a write's error stops the stage here
        for future in pending:
            future.result()
    progress.close()
    if unreadable:
        raise FileNotFoundError(f"pretokenize rank {dist.rank}: {len(unreadable)} shard(s) could not be opened: "
                                f"{', '.join(unreadable)}; the others are finished; run again to retry these")
    barrier()
    if dist.is_main:
        grids = [grid.shape[-1] for grid in _grids(model, torch.zeros(1, 3, resolution, resolution, device=dist.device))]
        _write_manifest(out, urls, names, weights_hash, cfg, model_cfg.model.codebook_size, grids)


class _TokenShard:
    """One output shard, written under a temporary name and renamed when complete; its stats file,
    written last, marks it finished and says what made it (`made_by`)."""

    def __init__(self, out: Path, name: str, source: str, made_by: dict) -> None:
        self.out, self.name, self.source, self.made_by, self.count = out, name, source, made_by, 0
        self.tar = webdataset.TarWriter(str(_temporary(out, name)), mtime=whole_second_mtime())

    def write(self, batch: dict, codes: torch.Tensor) -> None:
        for key, caption, text_tokens, image_tokens in zip(batch["key"], batch["caption"], batch["text_tokens"], codes):
            self.tar.write({"__key__": key, **token_members(caption, text_tokens, image_tokens)})
        self.count += len(batch["key"])

    def finish(self, skipped: dict) -> None:
        self.tar.close()
        os.replace(_temporary(self.out, self.name), self.out / self.name)
        _write_json(_stats_path(self.out, self.name), {"successes": self.count, "skipped": skipped, "source": self.source,
                                                       "made_by": self.made_by})

    def discard(self) -> None:
        self.tar.close()
        _temporary(self.out, self.name).unlink()


def _finished(out: Path, name: str, made_by: dict) -> bool:
    path = _stats_path(out, name)
    return path.exists() and json.loads(path.read_text()).get("made_by") == made_by


def read_manifest(shards: str, autoencoder: str) -> dict:
    """The manifest of token shards, after checking they were made by the autoencoder run
    `autoencoder` (its weights' sha256): a prior trained on them decodes with that run."""
    manifest_path = Path(expand_shards(shards)[0]).parent / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"{shards!r}: no {MANIFEST} beside the shards; were they written by the pretokenize stage?")
    manifest = json.loads(manifest_path.read_text())
    weights = Path(autoencoder) / "final" / "model.safetensors"
    actual = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.exists() else "(missing)"
    if manifest["autoencoder_sha256"] != actual:
        raise ValueError(f"the token shards in {manifest_path.parent} were made by an autoencoder with weights sha256 "
                         f"{manifest['autoencoder_sha256'][:12]}..., but {autoencoder!r} has {actual[:12]}...: "
                         "re-run pretokenize with this autoencoder, or point to the one that made them")
    return manifest


def _grids(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    codes = model.encode(images)
    return codes if isinstance(codes, tuple) else (codes,)


def encode(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, R, R) -> the codes of every grid the autoencoder makes, flattened in raster
    order and concatenated, (B, sum of h * w): the layout of KEY.image.npy."""
    return torch.cat([grid.flatten(1) for grid in _grids(model, images)], 1)


def split_codes(codes: torch.Tensor, grids: list[int]) -> list[torch.Tensor]:
    """Inverse of encode's layout: (B, sum of side ** 2) -> one (B, side, side) grid per side."""
    return [part.view(-1, side, side) for part, side in zip(codes.split([side ** 2 for side in grids], 1), grids)]


def _write_manifest(out: Path, urls: list[str], names: list[str], weights_hash: str, cfg: Config,
                    codebook_size: int, grids: list[int]) -> None:
    stats = {name: json.loads(_stats_path(out, name).read_text()) for name in names}
    _write_json(out / "sizes.json", {name: entry["successes"] for name, entry in stats.items()})
    _write_json(out / MANIFEST, {
        "source_shards": urls, "samples": {name: entry["successes"] for name, entry in stats.items()},
        "skipped": {name: entry["skipped"] for name, entry in stats.items() if entry["skipped"]},
        "autoencoder": str(Path(cfg.autoencoder).resolve()), "autoencoder_stage": cfg.autoencoder_stage,
        "autoencoder_sha256": weights_hash, "tokenizer": portable(cfg.tokenizer), "text_length": cfg.text_length,
        "code_grids": grids, "codebook_size": codebook_size})


def _stats_path(out: Path, name: str) -> Path:
    return out / (name.rsplit(".", 1)[0] + "_stats.json")


def _temporary(out: Path, name: str) -> Path:
    return out / f".{name}.tmp"


def _write_json(path: Path, value: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=1))
    os.replace(temporary, path)

