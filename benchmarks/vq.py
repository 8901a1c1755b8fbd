"""Our VectorQuantizer against vector-quantize-pytorch's VectorQuantize with matching settings
(EMA codebook, decay 0.99, commitment 0.25, eps 1e-5, no k-means init, no dead-code restarts,
plain straight-through gradient rather than its default rotation trick), at equal sizes, from the
same codebook and EMA state, on the same inputs, on the same device in the same run. Not a test.

Prints the fraction of identical code assignments over the timed steps, the largest codebook
difference after them (both EMA updates should agree), and forward+backward ms/step of each with
the ratio (peer / ours; > 1: ours is faster). The loss behind each backward is the layer's own plus
the mean square of z_q, a stand-in for a decoder.

    pip install -e '.[bench]'
    python benchmarks/vq.py --dim 64 --codebook-size 512 --batch 32 --grid 16 --steps 20
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
from torch import Tensor

from pipeline.models.vq import VectorQuantizer


def _time(step: Callable[[Tensor], Tensor], inputs: list[Tensor], device: torch.device) -> tuple[float, Tensor]:
    """Seconds per step over `inputs` after one warm-up step on the first, and the codes (steps, B, h, w)."""
    step(inputs[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    codes = []
    start = time.perf_counter()
    for x in inputs:
        codes.append(step(x))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(inputs), torch.stack(codes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--codebook-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError:
        raise SystemExit("vector-quantize-pytorch is not installed: pip install -e '.[bench]' "
                         "(or pip install vector-quantize-pytorch)") from None

    device = torch.device(args.device)
    torch.manual_seed(0)
    ours = VectorQuantizer(args.codebook_size, args.dim, beta=0.25, ema=True, decay=0.99, restart=False).to(device)
    peer = VectorQuantize(args.dim, args.codebook_size, decay=0.99, eps=1e-5, commitment_weight=0.25,
                          kmeans_init=False, threshold_ema_dead_code=0, rotation_trick=False,
                          sync_codebook=False, accept_image_fmap=True).to(device)
    with torch.no_grad():  # the same state: N = 1, m = e for every code
        peer._codebook.embed.copy_(ours.codebook[None])  # (1, K, D)
        peer._codebook.embed_avg.copy_(ours.codebook[None])
        peer._codebook.cluster_size.fill_(1.0)
    inputs = [torch.randn(args.batch, args.dim, args.grid, args.grid, device=device).requires_grad_()
              for _ in range(args.steps)]

    def ours_step(x: Tensor) -> Tensor:
        x.grad = None
        out = ours(x)
        (out.loss.mean() + out.z_q.square().mean()).backward()
        return out.codes

    def peer_step(x: Tensor) -> Tensor:
        x.grad = None
        z_q, codes, loss = peer(x)
        (loss + z_q.square().mean()).backward()
        return codes

    ours_s, ours_codes = _time(ours_step, inputs, device)
    peer_s, peer_codes = _time(peer_step, inputs, device)
    same = (ours_codes == peer_codes).float().mean().item()
    drift = (ours.codebook - peer._codebook.embed[0]).abs().max().item()
    threads = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"VQ layer forward+backward, D {args.dim}, K {args.codebook_size}, batch {args.batch}, "
          f"grid {args.grid}x{args.grid}, {args.steps} steps, {device.type} ({threads})")
    print(f"identical codes:          {same:.4f}")
    print(f"max codebook difference:  {drift:.2e}")
    print(f"t2i VectorQuantizer:      {ours_s * 1000:8.2f} ms/step")
    print(f"VectorQuantize:           {peer_s * 1000:8.2f} ms/step")
    print(f"ratio (peer / ours):      {peer_s / ours_s:.2f}  (> 1: ours is faster)")


if __name__ == "__main__":
    main()
