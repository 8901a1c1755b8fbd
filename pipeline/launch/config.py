"""Where a stage runs: its processes here (`t2i run`, `t2i train`) and its SLURM resources (`t2i submit`).

Every stage config holds one `launch` section, declared with `launch_field()`: resources never change
what a stage computes, so the run cache leaves them out of a stage's hash."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config import operational


@dataclass
class LaunchConfig:
    """Where a stage runs: processes here (`t2i run`), and its SLURM resources (`t2i submit`)."""

    nnodes: int = 1
    nproc_per_node: int = 1  # processes per node: one per GPU on GPU nodes
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem: str = ""  # e.g. "64G"; empty: the partition's default
    time: str = "01:00:00"  # SLURM time limit
    partition: str = ""
    account: str = ""
    qos: str = ""
    sbatch_extra: list[str] = field(default_factory=list)  # more `#SBATCH` options, e.g. "--constraint=a100"
    site_hook: str = ""  # a shell file sourced before the stage starts (module loads, venv activation)
    signal_grace_s: int = 120  # SLURM signals the job this long before its time limit; it checkpoints and requeues

    def validate(self) -> None:
        if self.nnodes < 1 or self.nproc_per_node < 1 or self.cpus_per_task < 1 or self.gpus_per_node < 0:
            raise ValueError("nnodes, nproc_per_node and cpus_per_task must be >= 1, gpus_per_node >= 0")
        if self.signal_grace_s < 1:
            raise ValueError("signal_grace_s must be >= 1")
        for option in self.sbatch_extra:
            if not option.startswith("--") or "\n" in option:
                raise ValueError(f"sbatch_extra entries are single long options like '--constraint=a100', got {option!r}")


def launch_field() -> Any:
    """The `launch` section of a stage config: operational (pipeline/config.py)."""
    return operational(default_factory=LaunchConfig)
