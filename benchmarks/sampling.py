"""Sampling speed of the priors against the algorithms they replaced, measured in the same run on CPU. Not a test.

    python benchmarks/sampling.py --threads 1 --batch-size 16

PixelCNN: `PixelCNN.generate` (PixelCNNSampler: each layer once per position, the vertical stack once per
row) against the loop it replaced, written below, which recomputes the whole network on the whole grid for
every position; on the model section of each --pixelcnn YAML (default: the VQ-VAE-2 bottom prior, 16 x 16
codes conditioned on the 8 x 8 top codes, and the single-level tiny prior, 8 x 8 codes with attention).
DALL-E: `DALLE.generate` with its preallocated KV cache against the same with a cache that grows by
concatenation at every position, as before, which copies all earlier keys and values again at each one;
at the tiny preset and at a larger shape (--dalle-grid, --dalle-width, --dalle-depth).

Both sides start from untrained weights (seed --seed) and draw with the same per-row generators, so each
pair should draw the same codes; the script prints whether it did. Each time is the best of --rounds
calls, before and now alternating; the ratio is before / now (> 1: now is faster).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from unittest import mock

import torch
import yaml
from torch import Tensor

from pipeline.config import load_config
from pipeline.models import dalle
from pipeline.models.autoregressive import KVCache, sample_logits
from pipeline.models.dalle import DALLE, PRESETS, DALLEConfig
from pipeline.models.pixelcnn import PixelCNN, PixelCNNConfig

ROOT = Path(__file__).resolve().parent.parent


def _best(rounds: int, before, now) -> tuple[float, Tensor, float, Tensor]:
    """Calls before() and now() in turn, rounds times: the least seconds of each and the tokens of its last call."""
    best = {before: float("inf"), now: float("inf")}
    tokens = {}
    for _ in range(rounds):
        for sample in best:
            start = time.perf_counter()
            tokens[sample] = sample()
            best[sample] = min(best[sample], time.perf_counter() - start)
    return best[before], tokens[before], best[now], tokens[now]


def _generators(n: int, seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + row) for row in range(n)]


def _captions(n: int, vocab_size: int, length: int, seed: int) -> Tensor:
    text = torch.randint(1, vocab_size, (n, length), generator=torch.Generator().manual_seed(seed))
    text[:, length // 2:] = 0  # padded captions, as the models see them
    return text


@torch.no_grad()
def recomputing_generate(model: PixelCNN, text: Tensor, condition: Tensor | None, guidance_scale: float,
                         generator: list[torch.Generator]) -> Tensor:
    """PixelCNN.generate as it was: the whole network over the whole grid for each of the grid^2 positions."""
    guided = guidance_scale != 1
    B, grid = text.shape[0], model.cfg.grid
    if guided:
        text = torch.cat([text, torch.zeros_like(text)])  # (2B, L)
        condition = None if condition is None else torch.cat([condition, condition])
    y = model.text(text)  # (B or 2B, W)
    codes = torch.zeros(B, grid, grid, dtype=torch.long)
    for p in range(grid * grid):
        i, j = divmod(p, grid)
        logits = model._logits(codes.repeat(2, 1, 1) if guided else codes, y, condition)[:, :, i, j].float()
        if guided:
            cond, uncond = logits.chunk(2)
            logits = uncond + guidance_scale * (cond - uncond)  # (B, K)
        codes[:, i, j] = sample_logits(logits, generator=generator)
    return codes.flatten(1)


class ConcatenatingKVCache(KVCache):
    """KVCache as it was: each append concatenates, copying every earlier position's keys and values."""

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys is not None:
            k, v = torch.cat([self.keys, k], 2), torch.cat([self.values, v], 2)
        self.keys, self.values, self.length = k, v, k.shape[2]
        return k, v


def _print_pair(before: str, before_s: float, now: str, now_s: float, same: bool) -> None:
    print(f"    {before + ':':34s} {before_s:8.2f} s")
    print(f"    {now + ':':34s} {now_s:8.2f} s")
    print(f"    ratio (before / now):              {before_s / now_s:8.1f}   identical samples: {same}")


def bench_pixelcnn(path: Path, args: argparse.Namespace) -> None:
    cfg = load_config(PixelCNNConfig, base=yaml.safe_load(path.read_text())["model"])
    torch.manual_seed(args.seed)
    model = PixelCNN(cfg).eval()
    b = args.batch_size
    text = _captions(b, cfg.text.vocab_size, cfg.text.max_length, args.seed)
    condition = None
    if cfg.condition_grid:
        condition = torch.randint(0, cfg.condition_codebook_size, (b, cfg.condition_grid ** 2),
                                  generator=torch.Generator().manual_seed(args.seed))
    g = args.guidance
    before_s, before, now_s, now = _best(
        args.rounds, lambda: recomputing_generate(model, text, condition, g, _generators(b, args.seed)),
        lambda: model.generate(text, condition, guidance_scale=g, generator=_generators(b, args.seed)))
    shape = f"condition {cfg.condition_grid}x{cfg.condition_grid}" if cfg.condition_grid else "no condition"
    print(f"  {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: grid {cfg.grid}x{cfg.grid}, "
          f"{cfg.channels} channels, {cfg.layers} layers, kernel {cfg.kernel_size}, {shape}, "
          f"attention {'every ' + str(cfg.attention_every) if cfg.attention else 'off'}")
    _print_pair("whole network per position", before_s, "PixelCNN.generate (incremental)", now_s,
                torch.equal(before, now))


def bench_dalle(name: str, cfg: DALLEConfig, args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    model = DALLE(cfg).eval()
    b = args.batch_size
    text = _captions(b, cfg.text_vocab_size, cfg.text_length, args.seed)

    def sample() -> Tensor:
        return model.generate(text, guidance_scale=args.guidance, generator=_generators(b, args.seed))

    def concatenating() -> Tensor:
        with mock.patch.object(dalle, "KVCache", ConcatenatingKVCache):  # generate builds the module's KVCache
            return sample()

    before_s, before, now_s, now = _best(args.rounds, concatenating, sample)
    print(f"  {name}: text {cfg.text_length} + image {cfg.image_grid}x{cfg.image_grid} tokens, width {cfg.width}, "
          f"depth {cfg.depth}, heads {cfg.heads}, vocab text {cfg.text_vocab_size} / image {cfg.image_vocab_size}")
    _print_pair("KV cache grown by concatenation", before_s, "preallocated KV cache", now_s, torch.equal(before, now))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixelcnn", type=Path, nargs="*",
                        default=[ROOT / "configs/pixelcnn/vqvae2-bottom.yaml", ROOT / "configs/pixelcnn/tiny.yaml"],
                        help="PixelCNN stage YAMLs whose model section to time (none: skip the PixelCNN)")
    parser.add_argument("--dalle-grid", type=int, default=32, help="image grid of the larger DALL-E shape")
    parser.add_argument("--dalle-width", type=int, default=256)
    parser.add_argument("--dalle-depth", type=int, default=4)
    parser.add_argument("--dalle-heads", type=int, default=4)
    parser.add_argument("--skip-dalle", action="store_true")
    parser.add_argument("--batch-size", type=int, default=16, help="images (captions) per call")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale for all")
    parser.add_argument("--rounds", type=int, default=1, help="calls per side; the least time counts")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"sampling {args.batch_size} images, guidance {args.guidance}, cpu, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, best of {args.rounds}")
    if args.pixelcnn:
        print("PixelCNN:")
        for path in args.pixelcnn:
            bench_pixelcnn(path.resolve(), args)
    if not args.skip_dalle:
        print("DALL-E:")
        bench_dalle("tiny preset", PRESETS["tiny"], args)
        larger = DALLEConfig(text_length=32, image_grid=args.dalle_grid, width=args.dalle_width,
                             depth=args.dalle_depth, heads=args.dalle_heads, conv_kernel=1)
        bench_dalle("larger", larger, args)


if __name__ == "__main__":
    main()
