"""pretokenize's images/s against the dVAE encoder's forward alone on tensors already in memory
(the bound for this work), on the same CPU in the same run. Not a test. Aim: >= 0.85.

A tiny encoder (the default) is the hard case: reading, decoding, tokenizing and writing cost about
as much per image as encoding. The paper's dVAE is the stage's real work:

    python benchmarks/pretokenize.py --count 4096
    python benchmarks/pretokenize.py --count 32 --resolution 256 --n-hid 256 --codebook-size 8192 \
        --batch-size 4 --shard-size 4 --bound-passes 2
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch

from pipeline.config import dump_config, load_config
from pipeline.data.build import shapes_examples, write_shards
from pipeline.engine.host_memory import keep_freed_memory
from stages import dvae, pretokenize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=512)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--n-hid", type=int, default=32)
    parser.add_argument("--codebook-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="the stage's cpu_threads (0: its default)")
    parser.add_argument("--shard-size", type=int, default=128, help="samples per input shard")
    parser.add_argument("--bound-passes", type=int, default=3, help="the bound is the best of this many passes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_shards(shapes_examples(args.count, args.resolution, seed=0), root / "shapes", args.shard_size, args.count)
        cfg = load_config(dvae.Config, None, [f"data.shards={root / 'shapes'}", f"trainer.out_dir={root / 'dvae'}",
                                              f"data.resolution={args.resolution}", f"model.image_size={args.resolution}",
                                              f"model.n_hid={args.n_hid}", f"model.codebook_size={args.codebook_size}"])
        model = dvae.build_model(cfg).eval()
        (root / "dvae" / "final").mkdir(parents=True)
        safetensors.torch.save_file(model.state_dict(), root / "dvae" / "final" / "model.safetensors")
        dump_config(cfg, root / "dvae" / "config.yaml")

        def stage_seconds(shards: list[str], out: str) -> float:
            tokens_cfg = load_config(pretokenize.Config, None, [
                f"shards={'::'.join(shards)}", f"autoencoder={root / 'dvae'}", f"out_dir={root / out}",
                f"batch_size={args.batch_size}", f"num_workers={args.workers}", f"cpu_threads={args.threads}"])
            start = time.perf_counter()
            pretokenize.run(tokens_cfg)
            return time.perf_counter() - start

        # The whole run, and a run over its first eighth: their difference is the steady-state rate,
        # without the start-up (model load, loader workers, the first batch) that a long run amortises.
        # An untimed run first pays this process's one-time imports (accelerate's, and open_clip's
        # without loader workers: seconds), which would otherwise fall on the first timed run only
        # and inflate the difference.
        shards = sorted(str(path) for path in (root / "shapes").glob("*.tar"))
        stage_seconds(shards[:1], "tokens-warm-up")
        few = max(1, len(shards) // 8)
        few_count = few * args.shard_size
        few_seconds = stage_seconds(shards[:few], "tokens-few")
        all_seconds = stage_seconds(shards, "tokens")
        stage_rate = args.count / all_seconds
        steady_rate = (args.count - few_count) / (all_seconds - few_seconds)

        # the bound: the encoder as the stage runs it (channels-last, its allocator setting), on every
        # core, no data to read
        keep_freed_memory()
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        model.to(memory_format=torch.channels_last)
        images = (torch.rand(args.count, 3, args.resolution, args.resolution) * 2 - 1).contiguous(memory_format=torch.channels_last)
        model.encode(images[:args.batch_size])  # warm-up
        encoder_rate = 0.0
        for _ in range(args.bound_passes):  # the best of several passes: the bound, not a noisy sample of it
            start = time.perf_counter()
            for first in range(0, args.count, args.batch_size):
                model.encode(images[first:first + args.batch_size])
            encoder_rate = max(encoder_rate, args.count / (time.perf_counter() - start))
    print(f"{args.count} images {args.resolution}px, dVAE n_hid {args.n_hid}, K {args.codebook_size}, "
          f"batch {args.batch_size}, {args.workers} loader worker(s); encoder alone on {torch.get_num_threads()} threads")
    print(f"encoder forward alone on preloaded tensors:                        {encoder_rate:8.2f} images/s")
    print(f"pretokenize stage (read, decode, encode, write; start-up included): {stage_rate:8.2f} images/s, "
          f"ratio {stage_rate / encoder_rate:.2f}")
    print(f"pretokenize stage, steady state ({args.count} minus {few_count} images):   {steady_rate:8.2f} images/s, "
          f"ratio {steady_rate / encoder_rate:.2f}")


if __name__ == "__main__":
    main()
