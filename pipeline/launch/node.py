"""The per-node launcher a SLURM job's `srun` starts once on each node.

It derives torchrun's rendezvous from SLURM's environment — the first node of
SLURM_JOB_NODELIST hosts it, this node's rank is SLURM_NODEID — and execs torchrun (or, for one
process on one node, the stage itself), so SLURM's signals reach it directly. Nothing is set by hand.

    python -m pipeline.launch.node --nproc-per-node 4 --grace 120 -- stage dalle -c cfg.yaml k=v
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

# torchrun forwards these to its workers; USR1 is SLURM's warning before the time limit.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def rendezvous_host() -> str:
    """The address of the allocation's first node (its NodeAddr, which may differ from its name)."""
    first = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                           capture_output=True, text=True, check=True).stdout.split()[0]
    node = subprocess.run(["scontrol", "show", "node", first, "-o"], capture_output=True, text=True).stdout
    fields = dict(item.split("=", 1) for item in node.split() if "=" in item)
    return fields.get("NodeAddr", first)


def command(nproc_per_node: int, grace_s: int, stage_args: list[str]) -> list[str]:
    nnodes = int(os.environ.get("SLURM_NNODES", "1"))
    if nnodes == 1 and nproc_per_node == 1:
        return [sys.executable, "-m", "pipeline.cli", *stage_args]
    port = 20000 + int(os.environ["SLURM_JOB_ID"]) % 20000  # one port per job: jobs may share a node
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
            f"--node-rank={os.environ['SLURM_NODEID']}", f"--nproc-per-node={nproc_per_node}",
            f"--master-addr={rendezvous_host()}", f"--master-port={port}",
            f"--signals-to-handle={FORWARDED_SIGNALS}", f"--shutdown-timeout={grace_s}",
            "-m", "pipeline.cli", *stage_args]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--grace", type=int, default=120, help="seconds the workers get to checkpoint on a signal")
    parser.add_argument("stage_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    stage_args = args.stage_args[1:] if args.stage_args[:1] == ["--"] else args.stage_args
    print(f"t2i: node {os.environ.get('SLURMD_NODENAME', '?')} (node rank {os.environ.get('SLURM_NODEID', 0)} "
          f"of {os.environ.get('SLURM_NNODES', 1)}) starting {args.nproc_per_node} process(es)", flush=True)
    argv_to_run = command(args.nproc_per_node, args.grace, stage_args)
    os.execv(argv_to_run[0], argv_to_run)


if __name__ == "__main__":
    main()
