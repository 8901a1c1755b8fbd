"""The `pretokenize` stage: image-text shards -> token shards, with a trained dVAE.

Each input shard `NAME.tar` becomes `OUT/NAME.tar` holding, per sample, `KEY.txt` (the caption),
`KEY.text.npy` (caption tokens) and `KEY.image.npy` (the dVAE's argmax codes), both uint16, plus
`OUT/NAME_stats.json` (samples written, samples skipped by reason), written last: a shard with its
stats file is finished, and a re-run skips it. Ranks (torchrun, any number of nodes) take disjoint
shards: shard i goes to rank i % world_size. Rank 0 finally writes `manifest.json`: the source
shards, the sample counts and the sha256 of the dVAE weights that made the tokens.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import webdataset
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from pipeline.data.samples import collate, image_sample, token_members
from pipeline.data.tars import Skip, expand_shards, iter_raw_samples
from pipeline.data.text import make_tokenizer
from pipeline.engine.config import LaunchConfig
from pipeline.engine.distributed import barrier, setup, teardown
from stages.dvae import load_trained

OUTPUT = "out_dir"
MANIFEST = "manifest.json"


@dataclass
class Config:
    out_dir: str = ""
    shards: str = ""  # the image-text shards: pattern, folder or '::'-joined list
    dvae: str = ""  # the dvae stage's output folder
    tokenizer: str = "open_clip:ViT-B-32"
    text_length: int = 32
    batch_size: int = 64
    num_workers: int = 2
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def validate(self) -> None:
        for key in ("out_dir", "shards", "dvae"):
            if not getattr(self, key):
                raise ValueError(f"{key} is required")


class _ShardBatches(IterableDataset):
    """(shard index, batch or None, skips) for this rank's unfinished shards, whole shards per loader
    worker; skips (reason -> count) is None except on a shard's last batch."""

    def __init__(self, urls: list[tuple[int, str]], resolution: int, batch_size: int) -> None:
        self.urls, self.resolution, self.batch_size = urls, resolution, batch_size

    def __iter__(self) -> Iterator[tuple[int, dict | None, dict | None]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for index, url in self.urls[worker::workers]:
            samples, skipped = [], {}
            for item in iter_raw_samples(url):
                sample = item if isinstance(item, Skip) else image_sample(item, self.resolution, "center", random.Random(0))
                if isinstance(sample, Skip):
                    skipped[sample.reason] = skipped.get(sample.reason, 0) + 1
                    continue
                samples.append(sample)
                if len(samples) == self.batch_size:
                    yield index, collate(samples), None
                    samples = []
            yield index, collate(samples) if samples else None, skipped  # the shard's last batch


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
    model, dvae_cfg, dvae_hash = load_trained(cfg.dvae)
    model.to(dist.device)
    urls = expand_shards(cfg.shards)
    names = [Path(url).name for url in urls]
    if len(set(names)) != len(names):
        raise ValueError(f"shards={cfg.shards!r}: shard file names must be unique, they name the outputs")
    mine = [(index, url) for index, url in enumerate(urls)
            if index % dist.world_size == dist.rank and not _stats_path(out, names[index]).exists()]
    tokenize = make_tokenizer(cfg.tokenizer, cfg.text_length)
    dataset = _ShardBatches(mine, dvae_cfg.data.resolution, cfg.batch_size)
    loader = DataLoader(dataset, batch_size=None, num_workers=min(cfg.num_workers, len(mine)))
    writers: dict[int, tuple[webdataset.TarWriter, int]] = {}
    progress = tqdm(total=len(mine), desc=f"pretokenize rank {dist.rank}", unit="shard", disable=not mine)
    for index, batch, skipped in loader:
        writer, count = writers.get(index) or (webdataset.TarWriter(str(_temporary(out, names[index]))), 0)
        if batch is not None:
            codes = model.encode(batch["image"].to(dist.device)).flatten(1)  # (B, h*w)
            text = tokenize(batch["caption"])
            for key, caption, text_tokens, image_tokens in zip(batch["key"], batch["caption"], text, codes):
                writer.write({"__key__": key, **token_members(caption, text_tokens, image_tokens)})
            count += len(batch["key"])
        writers[index] = (writer, count)
        if skipped is not None:  # the shard's last batch
            writer.close()
            os.replace(_temporary(out, names[index]), out / names[index])
            _write_json(_stats_path(out, names[index]), {"successes": count, "skipped": skipped, "source": urls[index]})
            del writers[index]
            progress.update(1)
    progress.close()
    barrier()
    if dist.is_main:
        _write_manifest(out, urls, names, dvae_hash, cfg, dvae_cfg, model.tokens_per_side)


def _write_manifest(out: Path, urls: list[str], names: list[str], dvae_hash: str, cfg: Config, dvae_cfg,
                    tokens_per_side: int) -> None:
    stats = {name: json.loads(_stats_path(out, name).read_text()) for name in names}
    _write_json(out / "sizes.json", {name: entry["successes"] for name, entry in stats.items()})
    _write_json(out / MANIFEST, {
        "source_shards": urls, "samples": {name: entry["successes"] for name, entry in stats.items()},
        "skipped": {name: entry["skipped"] for name, entry in stats.items() if entry["skipped"]},
        "dvae": str(Path(cfg.dvae).resolve()), "dvae_sha256": dvae_hash, "tokenizer": cfg.tokenizer,
        "text_length": cfg.text_length, "image_tokens_per_side": tokens_per_side,
        "codebook_size": dvae_cfg.model.codebook_size})


def _stats_path(out: Path, name: str) -> Path:
    return out / (name.rsplit(".", 1)[0] + "_stats.json")


def _temporary(out: Path, name: str) -> Path:
    return out / f".{name}.tmp"


def _write_json(path: Path, value: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=1))
    os.replace(temporary, path)
