"""`t2i shards stats`: read a data set through the training loader and report what it holds."""
from __future__ import annotations

import os
import time

from tqdm import tqdm

from pipeline.config import load_config
from pipeline.data.loader import DataConfig, StreamingLoader


def shard_stats(pattern: str, resolution: int = 64, num_workers: int = 2, batch_size: int = 64) -> dict:
    """Reads every sample once (exactly-once mode, one rank) and returns samples, skipped (reason ->
    count), bad_shards, shards, bytes (local shards only) and images_per_second."""
    cfg = load_config(DataConfig, base=dict(shards=pattern, resolution=resolution, batch_size=batch_size,
                                            num_workers=num_workers, shuffle_shards=False, shuffle_buffer=0))
    loader = StreamingLoader(cfg, enforce_budget=False)
    start = time.perf_counter()
    for _ in tqdm(loader.epoch_batches(), total=loader.steps_per_epoch, desc="reading", unit="batch"):
        pass
    seconds = time.perf_counter() - start
    totals = loader.totals()
    local = [url for url in loader.urls if os.path.exists(url)]
    return {"samples": totals["samples"], "skipped": totals["skipped"], "bad_shards": totals["bad_shards"],
            "shards": len(loader.urls), "bytes": sum(os.path.getsize(url) for url in local),
            "seconds": round(seconds, 3), "images_per_second": round(totals["samples"] / max(seconds, 1e-9), 1)}


def format_stats(stats: dict) -> str:
    lines = [f"shards            {stats['shards']}",
             f"samples read      {stats['samples']}",
             f"samples skipped   {sum(stats['skipped'].values())}"]
    lines += [f"  {reason:<16}{count}" for reason, count in sorted(stats["skipped"].items())]
    lines += [f"bytes             {stats['bytes']:,}",
              f"images/s          {stats['images_per_second']:.1f}"]
    if stats["bad_shards"]:
        worst = sorted(stats["bad_shards"].items(), key=lambda kv: -kv[1])[:5]
        lines += ["worst shards"] + [f"  {url}  {count}" for url, count in worst]
    return "\n".join(lines)
