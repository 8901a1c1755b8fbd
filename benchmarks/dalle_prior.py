"""DALL-E prior: training and sampling tokens/s of ours (`pipeline.models.dalle.DALLE`) against the peer
dalle-pytorch's `DALLE` (1.6.6) at equal depth, width, heads, head size, text length, image grid and
vocabularies, dense causal attention, fp32, the same batch and threads, in the same process. Not a test.
Needs a venv holding both (benchmarks/peer_venv.sh makes one; this script puts the repository on sys.path):

    bash benchmarks/peer_venv.sh python benchmarks/dalle_prior.py --depth 4 --width 256 --heads 4 \\
        --text-length 32 --image-grid 16 --batch-size 8 --steps 5

Training: one step = forward + backward + AdamW step on random caption and image token ids (the peer
takes image codes directly: `DALLE(text, image_codes, return_loss=True)`), tokens/s = batch x
(text_length + image_grid^2) / s per step.
Sampling: one call = image_grid^2 image tokens per caption, caption prefill included, tokens/s =
batch x image_grid^2 / s per call. Ours: `DALLE.generate`, KV-cached. Peer: by default the loop of its
`generate_images` with its KV cache passed to `forward(..., cache=...)`: `generate_images(use_cache=True)`
hands the cache on only when cond_scale != 1, so at cond_scale 1 it recomputes the whole prefix for
every token. --peer-sampling uncached (or both) times `generate_images` itself, that default path; its
VAE decode is replaced by the identity, so only token generation is timed either way.
With --guidance != 1 the peer's null-caption pass zeroes the caption in place (`text *= ...` on a view
of its token buffer), so its later steps see no caption; that changes its samples, not its cost.

Left as they differ: the peer's feed-forward is GEGLU (12 width^2 weights per block against our 8),
its attention is einsum + softmax (ours SDPA), its output head spans text + image vocabularies at every
position (ours: a text head on text positions, an image head on image positions), it samples with
top-k (filter_thres 0.5) + Gumbel noise (ours: plain softmax sampling). Its rotary embeddings and token
shift are off unless --peer-rotary / --peer-shift-tokens (they are on in its defaults); off, its
positions are learned text positions + summed row and column embeddings, as ours.
Each figure is the best of --rounds rounds, ours and peer alternating.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.models.dalle import DALLE, DALLEConfig  # noqa: E402


def _time(step, steps: int, warmup: bool = True) -> float:
    if warmup:
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def _best(rounds: int, *timers):
    """Alternates the timers for rounds rounds; the least seconds of each."""
    best = [float("inf")] * len(timers)
    for _ in range(rounds):
        for i, timer in enumerate(timers):
            best[i] = min(best[i], timer())
    return best


def _import_peer():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dalle_pytorch imports pkg_resources
            import dalle_pytorch
            from dalle_pytorch import DALLE as PeerDALLE
            from dalle_pytorch import DiscreteVAE as PeerVAE
            from dalle_pytorch.dalle_pytorch import gumbel_sample, top_k
    except ImportError as e:
        sys.exit(f"cannot import dalle_pytorch ({e}): run with benchmarks/peer_venv.sh, see this file's docstring")
    return dalle_pytorch.__version__, PeerDALLE, PeerVAE, gumbel_sample, top_k


def _peer_vae(PeerVAE, grid: int, vocab: int):
    """A dalle-pytorch DiscreteVAE whose token grid is grid x grid (image_size // 2 ** num_layers), as
    small as it allows; for a grid that is not a power of 2 (its image_size must be) a bare instance with
    just the attributes DALLE reads. Its decode is the identity: only tokens are generated and timed."""
    if grid & (grid - 1) == 0:
        vae = PeerVAE(image_size=2 * grid, num_layers=1, num_tokens=vocab, codebook_dim=16, hidden_dim=16)
    else:
        vae = PeerVAE.__new__(PeerVAE)
        torch.nn.Module.__init__(vae)
        vae.image_size, vae.num_layers, vae.num_tokens, vae.channels = grid, 0, vocab, 3
    vae.decode = lambda img_seq: img_seq
    return vae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--text-length", type=int, default=32)
    parser.add_argument("--image-grid", type=int, default=16)
    parser.add_argument("--text-vocab", type=int, default=49408)
    parser.add_argument("--image-vocab", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sample-batch-size", type=int, default=None, help="default: --batch-size")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per round (after one warm-up)")
    parser.add_argument("--sample-steps", type=int, default=1, help="timed sampling calls per round (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--guidance", type=float, default=1.0,
                        help="classifier-free guidance scale for both (ours guidance_scale, peer cond_scale)")
    parser.add_argument("--peer-sampling", choices=["cached", "uncached", "both"], default="cached")
    parser.add_argument("--peer-rotary", action="store_true", help="the peer's rotary embeddings (its default)")
    parser.add_argument("--peer-shift-tokens", action="store_true", help="the peer's token shift (its default)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-sample", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    peer_version, PeerDALLE, PeerVAE, gumbel_sample, top_k = _import_peer()

    lt, grid, n = args.text_length, args.image_grid, args.image_grid ** 2
    cfg = DALLEConfig(text_vocab_size=args.text_vocab, text_length=lt, image_vocab_size=args.image_vocab,
                      image_grid=grid, width=args.width, depth=args.depth, heads=args.heads, dropout=0.0,
                      attention="dense", conv_kernel=1, caption_dropout=0.0)
    ours = DALLE(cfg)
    peer = PeerDALLE(dim=args.width, vae=_peer_vae(PeerVAE, grid, args.image_vocab), num_text_tokens=args.text_vocab,
                     text_seq_len=lt, depth=args.depth, heads=args.heads, dim_head=args.width // args.heads,
                     attn_types=("full",), rotary_emb=args.peer_rotary, shift_tokens=args.peer_shift_tokens)
    assert peer.image_seq_len == n and peer.num_image_tokens == args.image_vocab
    peer_params = [p for p in peer.parameters() if p.requires_grad]  # its VAE is frozen
    ours_opt, peer_opt = torch.optim.AdamW(ours.parameters()), torch.optim.AdamW(peer_params)

    print(f"DALL-E prior, depth {args.depth}, width {args.width}, heads {args.heads} x {args.width // args.heads}, "
          f"text {lt} + image {grid}x{grid} tokens, vocab text {args.text_vocab} / image {args.image_vocab}, "
          f"dense causal attention, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"parameters: t2i {sum(p.numel() for p in ours.parameters()) / 1e6:.2f}M, dalle-pytorch {peer_version} "
          f"{sum(p.numel() for p in peer_params) / 1e6:.2f}M (rotary {'on' if args.peer_rotary else 'off'}, "
          f"token shift {'on' if args.peer_shift_tokens else 'off'})")

    if not args.skip_train:
        b = args.batch_size
        text = torch.randint(1, args.text_vocab, (b, lt))
        text[:, lt // 2:] = 0  # padded captions, as both models expect them
        image = torch.randint(0, args.image_vocab, (b, n))
        batch = {"text_tokens": text, "image_tokens": image, "valid": torch.ones(b, dtype=torch.bool)}
        ours.train()
        peer.train()

        def ours_step() -> None:
            ours_opt.zero_grad()
            ours(batch)["loss"].backward()
            ours_opt.step()

        def peer_step() -> None:
            peer_opt.zero_grad()
            peer(text, image, return_loss=True).backward()
            peer_opt.step()

        ours_s, peer_s = _best(args.rounds, lambda: _time(ours_step, args.steps), lambda: _time(peer_step, args.steps))
        tokens = b * (lt + n)
        print(f"training (forward + backward + AdamW), batch {b}, {lt + n} tokens per sample:")
        print(f"  t2i DALLE:              {tokens / ours_s:10.0f} tokens/s  ({ours_s * 1000:8.1f} ms/step)")
        print(f"  dalle-pytorch DALLE:    {tokens / peer_s:10.0f} tokens/s  ({peer_s * 1000:8.1f} ms/step)")
        print(f"  ratio (ours / peer):    {peer_s / ours_s:.2f}  (> 1: ours is faster)")

    if not args.skip_sample:
        b = args.sample_batch_size or args.batch_size
        text = torch.randint(1, args.text_vocab, (b, lt))
        text[:, lt // 2:] = 0
        ours.eval()
        peer.eval()
        g = args.guidance
        generator = torch.Generator().manual_seed(args.seed)

        def ours_sample() -> None:
            ours.generate(text, guidance_scale=g, generator=generator)

        @torch.no_grad()
        def peer_sample_cached() -> None:  # generate_images' loop, the cache handed to forward at any cond_scale
            out, cache = text, {}
            for _ in range(n):
                t, i = out[:, :lt], out[:, lt:]
                logits = peer(t, i, cache=cache) if g == 1 else peer.forward_with_cond_scale(t, i, cond_scale=g, cache=cache)
                sample = gumbel_sample(top_k(logits[:, -1], thres=0.5), temperature=1.0, dim=-1) - peer.num_text_tokens
                out = torch.cat((out, sample[:, None]), 1)

        def peer_sample_uncached() -> None:  # its own generate_images, default use_cache=False; decode is the identity
            peer.generate_images(text, filter_thres=0.5, cond_scale=g)

        peers = {"cached": [("dalle-pytorch, KV cache:", peer_sample_cached)],
                 "uncached": [("dalle-pytorch, no cache:", peer_sample_uncached)]}
        peers["both"] = peers["cached"] + peers["uncached"]
        timers = [lambda: _time(ours_sample, args.sample_steps)]
        timers += [lambda f=f: _time(f, args.sample_steps, warmup=f is peer_sample_cached) for _, f in peers[args.peer_sampling]]
        ours_s, *peer_s = _best(args.rounds, *timers)
        tokens = b * n
        print(f"sampling, batch {b}, {n} image tokens per caption after {lt} caption tokens, guidance {g}:")
        print(f"  t2i DALLE.generate:       {tokens / ours_s:10.0f} tokens/s  ({ours_s:8.2f} s/call)  KV cache")
        for (name, _), s in zip(peers[args.peer_sampling], peer_s):
            print(f"  {name:25s} {tokens / s:10.0f} tokens/s  ({s:8.2f} s/call)")
            print(f"    ratio (ours / peer):    {s / ours_s:.2f}  (> 1: ours is faster)")


if __name__ == "__main__":
    main()
