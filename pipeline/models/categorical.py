"""Categorical latents shared by the discrete models (DALL-E's dVAE, the Gumbel-softmax VAE, VQ layers).

The Gumbel-softmax relaxation (Jang et al. 2017, "Categorical Reparameterization with Gumbel-Softmax";
Maddison et al. 2017, "The Concrete Distribution"): y = softmax((log pi + g) / tau), g ~ Gumbel(0, 1),
approaches a one-hot sample of pi as tau -> 0; its KL to the uniform prior; codebook usage metrics;
and the cosine schedules used to anneal tau and ramp KL weights.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def cosine_schedule(step: int, start: float, end: float, steps: int) -> float:
    """`start` at step <= 0, `end` at step >= steps, half a cosine period in between (monotone)."""
    if step >= steps:
        return end
    return start + (end - start) * 0.5 * (1 - math.cos(math.pi * max(step, 0) / steps))


def gumbel_softmax(logits: Tensor, temperature: float, hard: bool) -> Tensor:
    """A relaxed sample softmax((logits + g) / temperature) over dim 1, g ~ Gumbel(0, 1). With
    `hard` the value is exactly the one-hot of its argmax while the gradient is the relaxed one."""
    # -log(-log U), U ~ Uniform(tiny, 1): several times faster on CPU than -log of exponential_().
    # In float32 whatever the logits' dtype: bf16's U stops at 1 - 2^-8, which caps the noise at 5.5
    # (the largest of 8192 draws is about 9.6), and can be exactly 1 on CUDA (infinite noise).
    uniform = torch.empty_like(logits, dtype=torch.float32).uniform_(torch.finfo(torch.float32).tiny, 1)
    gumbels = -uniform.log().neg_().log()
    soft = ((logits.float() + gumbels) / temperature).softmax(1).to(logits.dtype)
    if not hard:
        return soft
    # hard + (soft - soft) is exact in the forward pass, unlike hard - soft + soft.
    one_hot = torch.zeros_like(soft).scatter_(1, soft.argmax(1, keepdim=True), 1.0)
    return one_hot + (soft - soft.detach())


def kl_to_uniform(logits: Tensor) -> Tensor:
    """KL(softmax(logits) || U(K)) over dim 1 of (B, K, h, w), summed over positions -> (B,)."""
    log_q = logits.log_softmax(1)
    return (log_q.exp() * (log_q + math.log(logits.shape[1]))).flatten(1).sum(1)


def usage_gap(logits: Tensor, valid: Tensor) -> Tensor:
    """log K - H(p), p = softmax(logits) over dim 1 of (B, K, ...) averaged over the valid samples and
    all positions: 0 when the batch spreads evenly over the K codes, log K when it uses one. The
    diversity loss of wav2vec 2.0 (Baevski et al. 2020), differentiable in the logits."""
    probs = logits[valid].softmax(1).transpose(0, 1).flatten(1)  # (K, valid samples * positions)
    if probs.shape[1] == 0:  # no valid sample: no usage to measure
        return logits.new_zeros(())
    probs = probs.mean(1)  # (K,)
    return math.log(logits.shape[1]) + torch.special.xlogy(probs, probs).sum()


@torch.no_grad()
def codebook_usage(codes: Tensor, valid: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    """(perplexity, dead codes) of the codes (B, h, w) of valid samples: exp of the entropy of
    their histogram, in [1, K], and the number of codes never used, in [0, K], as float tensors."""
    counts = torch.bincount(codes[valid].flatten(), minlength=codebook_size).float()
    p = counts / counts.sum().clamp(min=1)
    return torch.special.xlogy(p, p).sum().neg().exp(), (counts == 0).sum().float()
