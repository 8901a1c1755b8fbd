"""Where a stage runs: its processes here (`t2i run`, `t2i train`) and its SLURM resources (`t2i submit`).

Every stage config holds one `launch` section, declared with `launch_field()`: resources never change
what a stage computes, so the run cache leaves them out of a stage's hash."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import operational
from pipeline.ranges import FieldError, NonNegativeInt, PositiveInt

# sbatch's --time formats (minutes, [[days-]hours:]minutes:seconds, days-hours[:minutes]) and --mem sizes
_SLURM_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+(:\d{1,2}(:\d{1,2})?)?|unlimited|infinite)$", re.I)
_SLURM_MEM = re.compile(r"^\d+[KMGT]?$", re.I)  # 0: all of the node's memory


@dataclass
class LaunchConfig:
    """Where a stage runs: processes here (`t2i run`), and its SLURM resources (`t2i submit`)."""

    nnodes: PositiveInt = 1
    nproc_per_node: PositiveInt = 1  # processes per node: one per GPU on GPU nodes
    gpus_per_node: NonNegativeInt = 0
    cpus_per_task: PositiveInt = 2
    mem: str = ""  # e.g. "64G"; empty: the partition's default
    time: str = "01:00:00"  # SLURM time limit
    partition: str = ""
    account: str = ""
    qos: str = ""
    sbatch_extra: list[str] = field(default_factory=list)  # more `#SBATCH` options, e.g. "--constraint=a100"
    site_hook: str = ""  # a shell file sourced before the stage starts (module loads, venv activation)
    signal_grace_s: PositiveInt = 120  # SLURM signals the job this long before its time limit; it checkpoints and requeues
    max_restarts: NonNegativeInt = 100  # times a job requeues itself after checkpointing on a signal

    def validate(self) -> None:
        if not _SLURM_TIME.match(self.time):
            raise FieldError("time", f"must be a SLURM time limit like '01:00:00', '90' (minutes) or '2-00:00:00', "
                                     f"got {self.time!r}")
        if self.mem and not _SLURM_MEM.match(self.mem):
            raise FieldError("mem", f"must be a size like '64G' or '4000M' (0: all of a node's), got {self.mem!r}")
        for option in self.sbatch_extra:
            if not option.startswith("--") or "\n" in option:
                raise ValueError(f"sbatch_extra entries are single long options like '--constraint=a100', got {option!r}")


def launch_field() -> Any:
    """The `launch` section of a stage config: operational (pipeline/config.py)."""
    return operational(default_factory=LaunchConfig)
