"""dVAE training step: ours against OpenAI's released modules (`dall_e.Encoder` / `dall_e.Decoder`)
with the same loss, at equal sizes, on the same CPU in the same run. Not a test.

    python benchmarks/dvae.py --resolution 64 --n-hid 64 --batch-size 8 --steps 5
"""
from __future__ import annotations

import argparse
import time

import torch

from pipeline.models.categorical import gumbel_softmax
from pipeline.models.dvae import DiscreteVAE, DVAEConfig, logit_laplace_nll, map_pixels


def _time(step, steps: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--n-hid", type=int, default=64)
    parser.add_argument("--codebook-size", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    import dall_e

    cfg = DVAEConfig(image_size=args.resolution, codebook_size=args.codebook_size, n_hid=args.n_hid)
    ours = DiscreteVAE(cfg)
    encoder = dall_e.Encoder(n_hid=args.n_hid, vocab_size=args.codebook_size, device=torch.device("cpu"))
    decoder = dall_e.Decoder(n_hid=args.n_hid, vocab_size=args.codebook_size, device=torch.device("cpu"))
    images = torch.rand(args.batch_size, 3, args.resolution, args.resolution) * 2 - 1
    batch = {"image": images, "valid": torch.ones(args.batch_size, dtype=torch.bool)}
    ours_opt = torch.optim.AdamW(ours.parameters())
    peer_opt = torch.optim.AdamW([*encoder.parameters(), *decoder.parameters()])

    def ours_step() -> None:
        ours_opt.zero_grad()
        ours(batch)["loss"].backward()
        ours_opt.step()

    def peer_step() -> None:  # the same loss: relaxed codes, logit-Laplace NLL, KL to uniform (weight 0 at start)
        peer_opt.zero_grad()
        x = map_pixels((images + 1) / 2)
        z = gumbel_softmax(encoder(x), 1.0, hard=False)
        out = decoder(z)
        nll = logit_laplace_nll(x, out[:, :3], out[:, 3:]).flatten(1).sum(1).mean()
        nll.backward()
        peer_opt.step()

    ours_s, peer_s = _time(ours_step, args.steps), _time(peer_step, args.steps)
    print(f"dVAE step, {args.resolution}px, n_hid {args.n_hid}, K {args.codebook_size}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    print(f"t2i DiscreteVAE:      {ours_s * 1000:8.1f} ms/step")
    print(f"dall_e modules:       {peer_s * 1000:8.1f} ms/step")
    print(f"ratio (peer / ours):  {peer_s / ours_s:.2f}  (> 1: ours is faster)")


if __name__ == "__main__":
    main()
