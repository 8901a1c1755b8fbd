"""Vector quantisation (van den Oord et al. 2017, "Neural Discrete Representation Learning").

Each vector of an encoder output z_e (B, D, h, w) is replaced by its nearest entry of a codebook of
K vectors, e = e_k with k = argmin_j ||z_e - e_j||^2. The decoder reads z_q = e, and its gradient is
copied to z_e unchanged (straight-through: z_q = z_e + sg[e - z_e]). Per sample, summed over
positions and D:

    L_vq = ||sg[z_e] - e||^2 + beta * ||z_e - sg[e]||^2,   beta = 0.25,

the codebook term moving the entries towards the encoder outputs, the commitment term keeping the
encoder close to its entries. The model adds its reconstruction loss.

With `ema` the codebook term is dropped and each entry follows the exponential moving average of
the vectors assigned to it (appendix A.1; Razavi et al. 2019, "Generating Diverse High-Fidelity
Images with VQ-VAE-2"), with decay gamma and n_i the number of vectors assigned to code i in the batch:

    N_i <- gamma N_i + (1 - gamma) n_i,   m_i <- gamma m_i + (1 - gamma) sum_{z -> i} z,   e_i = m_i / N~_i,

where N~_i = (N_i + eps) / (sum_j N_j + K eps) * sum_j N_j is N_i Laplace-smoothed, so that a code
unused for a long time never divides by zero. N (`cluster_size`) and m (`embed_sum`) are buffers,
so checkpoints carry them; each code starts as a cluster of one, N_i = 1 and m_i = e_i.

Dead codes are restarted as in Jukebox (Dhariwal et al. 2020, section 2.2): in training, a code
whose usage average N_i falls below `dead_code_threshold` (default 1: fewer than one assigned
vector per batch) is moved onto a random encoder output of the batch, with N_i = 1 and m_i = that
vector. N is tracked without `ema` too, for this test only. Only valid samples count, for the
statistics as for the restarts. Under data parallelism (torch.distributed initialised) the batch
statistics are summed over replicas and the restart vectors broadcast from the first, so every
replica keeps the same codebook.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.categorical import codebook_usage


class Quantized(NamedTuple):
    z_q: Tensor  # (B, D, h, w) the entries, straight-through to z_e
    codes: Tensor  # (B, h, w) long
    loss: Tensor  # (B,) codebook_loss + beta * commitment_loss
    codebook_loss: Tensor  # (B,) ||sg[z_e] - e||^2; zeros with ema, where no gradient moves the codebook
    commitment_loss: Tensor  # (B,) ||z_e - sg[e]||^2, unweighted
    perplexity: Tensor  # () of the valid samples' codes, see categorical.codebook_usage
    dead_codes: Tensor  # () codes no valid sample used in this batch


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class VectorQuantizer(nn.Module):
    """The VQ layer: forward quantises and, in training, updates the codebook statistics."""
    codebook: Tensor  # (K, D): a Parameter, or a buffer with ema
    cluster_size: Tensor  # (K,) N
    embed_sum: Tensor  # (K, D) m, with ema only
    no_weight_decay = ("codebook",)  # code vectors, as embeddings are (engine/task.py)

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, ema: bool = False,
                 decay: float = 0.99, eps: float = 1e-5, dead_code_threshold: float = 1.0,
                 restart: bool = True) -> None:
        super().__init__()
        self.codebook_size, self.dim, self.beta, self.ema = codebook_size, dim, beta, ema
        self.decay, self.eps, self.dead_code_threshold, self.restart = decay, eps, dead_code_threshold, restart
        codebook = torch.randn(codebook_size, dim)
        if ema:
            self.register_buffer("codebook", codebook)
            self.register_buffer("embed_sum", codebook.clone())
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("cluster_size", torch.ones(codebook_size))

    def _nearest(self, z: Tensor) -> Tensor:
        """Vectors (N, D) float32 -> index (N,) of the nearest entry."""
        e = self.codebook.detach().float()  # (K, D)
        # Low-precision autocast would misassign near ties; ||z||^2 is the same for every entry.
        with torch.autocast(z.device.type, enabled=False):
            distance = torch.addmm(e.pow(2).sum(1), z, e.T, alpha=-2)  # (N, K) ||z - e||^2 - ||z||^2
        return distance.argmin(1)

    @torch.no_grad()
    def assign(self, z_e: Tensor) -> Tensor:
        """Encoder outputs (B, D, h, w) -> nearest codes (B, h, w); changes no state."""
        b, d, h, w = z_e.shape
        return self._nearest(z_e.float().permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)

    def lookup(self, codes: Tensor) -> Tensor:
        """Codes (B, h, w) -> entries (B, D, h, w)."""
        return F.embedding(codes, self.codebook).permute(0, 3, 1, 2)

    def forward(self, z_e: Tensor, valid: Tensor | None = None) -> Quantized:
        """Quantise z_e (B, D, h, w); `valid` (B,) bool marks the samples that count (default all)."""
        b, d, h, w = z_e.shape
        valid = torch.ones(b, dtype=torch.bool, device=z_e.device) if valid is None else valid
        z = z_e.float()
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, d)  # (B h w, D)
        codes = self._nearest(flat)  # (B h w,)
        e = F.embedding(codes, self.codebook.float()).view(b, h, w, d).permute(0, 3, 1, 2)  # (B, D, h, w)
        commitment_loss = (z - e.detach()).pow(2).flatten(1).sum(1)  # (B,)
        if self.ema:
            codebook_loss = torch.zeros_like(commitment_loss)
        else:
            codebook_loss = (z.detach() - e).pow(2).flatten(1).sum(1)
        z_q = z + (e - z).detach()
        perplexity, dead_codes = codebook_usage(codes.view(b, h, w), valid, self.codebook_size)
        if self.training:
            self._update(flat, codes, valid.repeat_interleave(h * w).to(flat.dtype))
        return Quantized(z_q, codes.view(b, h, w), codebook_loss + self.beta * commitment_loss,
                         codebook_loss, commitment_loss, perplexity, dead_codes)

    @torch.no_grad()
    def _update(self, flat: Tensor, codes: Tensor, weight: Tensor) -> None:
        """EMA statistics of the vectors `flat` (N, D) assigned `codes` (N,), each counted with
        `weight` (N,) (1 for a valid sample's vectors, else 0); then the codebook and the restarts."""
        k = self.codebook_size
        # A weighted one-hot and a matmul: deterministic, and faster on CPU than index_add_.
        assigned = flat.new_zeros(len(codes), k).scatter_(1, codes[:, None], weight[:, None])  # (N, K)
        # Counts [and sums] in one (K, 1 [+ D]) tensor, so replicas need a single all-reduce.
        stats = assigned.sum(0)[:, None]
        if self.ema:
            stats = torch.cat([stats, assigned.T @ flat], 1)
        if _distributed():
            dist.all_reduce(stats)
        self.cluster_size.lerp_(stats[:, 0], 1 - self.decay)
        if self.ema:
            self.embed_sum.lerp_(stats[:, 1:], 1 - self.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + k * self.eps) * n  # (K,) N~
            self.codebook.copy_(self.embed_sum / smoothed[:, None])
        if self.restart:
            self._restart(flat, weight)

    @torch.no_grad()
    def _restart(self, flat: Tensor, weight: Tensor) -> None:
        # cluster_size is the same on every replica, so they all agree on the dead codes.
        dead = (self.cluster_size < self.dead_code_threshold).nonzero().squeeze(1)  # (n_dead,)
        if not len(dead):
            return
        # An all-padding batch lends its padding, so that every replica still joins the broadcast.
        candidates = flat[weight > 0] if bool(weight.any()) else flat  # (M, D)
        order = torch.randperm(len(candidates), device=flat.device)
        # (n_dead, D): distinct vectors while there are enough, cycling through them after.
        new = candidates[order[torch.arange(len(dead), device=flat.device) % len(order)]]
        if _distributed():
            dist.broadcast(new, src=0)
        self.codebook.index_copy_(0, dead, new.to(self.codebook.dtype))
        self.cluster_size[dead] = 1.0
        if self.ema:
            self.embed_sum.index_copy_(0, dead, new)
