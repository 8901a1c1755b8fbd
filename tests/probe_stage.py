"""A stage that only records where and when it ran: the runner's scheduling tests use it.

It writes `started` when it begins, and `probe.json` (its cores, start and end) when it ends; on
SIGTERM it writes `terminated` and exits with the training stages' preemption code instead."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.markers import PREEMPTED_EXIT_CODE

OUTPUT = "out_dir"


@dataclass
class Config:
    out_dir: str = ""
    sleep_s: float = 0.0
    exit_code: int = 0  # what the stage exits with after its sleep


def run(cfg: Config) -> int:
    start = time.time()
    out = Path(cfg.out_dir)

    def terminated(signum, frame) -> None:
        (out / "terminated").write_text(str(os.getpid()))
        sys.exit(PREEMPTED_EXIT_CODE)

    signal.signal(signal.SIGTERM, terminated)
    (out / "started").write_text(str(os.getpid()))
    time.sleep(cfg.sleep_s)
    record = {"cores": sorted(os.sched_getaffinity(0)), "start": start, "end": time.time()}
    (out / "probe.json").write_text(json.dumps(record))
    print(f"probe {out.name} ran on {record['cores']}", flush=True)
    return cfg.exit_code
