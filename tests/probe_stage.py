"""A stage that only records where and when it ran: the runner's scheduling tests use it."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

OUTPUT = "out_dir"


@dataclass
class Config:
    out_dir: str = ""
    sleep_s: float = 0.0


def run(cfg: Config) -> int:
    start = time.time()
    time.sleep(cfg.sleep_s)
    record = {"cores": sorted(os.sched_getaffinity(0)), "start": start, "end": time.time()}
    Path(cfg.out_dir, "probe.json").write_text(json.dumps(record))
    print(f"probe {Path(cfg.out_dir).name} ran on {record['cores']}", flush=True)
    return 0
