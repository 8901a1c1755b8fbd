"""Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance") for the
caption-conditioned priors. In training each caption becomes all padding (token 0) with probability
p, so one network learns both p(c | y) and the unconditional p(c); at sampling time the logits are
moved away from the unconditional ones by the guidance scale w,

    logits = uncond + w * (cond - uncond),

w = 1 being plain conditional sampling and w > 1 sharpening the caption's effect.
"""
from __future__ import annotations

import torch
from torch import Tensor


def drop_captions(text: Tensor, probability: float, null: Tensor | None = None) -> Tensor:
    """Caption tokens (B, L) with each row replaced by the null caption with `probability`, one
    torch.rand draw of B values (no draw at all when probability is 0). The null caption is all
    padding, or `null` (L,): the tokens of the empty caption where a text encoder expects those."""
    if probability <= 0:
        return text
    drop = torch.rand(text.shape[0], device=text.device) < probability  # (B,)
    return text.masked_fill(drop[:, None], 0) if null is None else torch.where(drop[:, None], null, text)


def with_null_captions(text: Tensor) -> Tensor:
    """Caption tokens (B, L) -> (2B, L): the captions, then as many all-padding ones, so that one
    batch gives the conditional logits (first half) and the unconditional ones (second half)."""
    return torch.cat([text, torch.zeros_like(text)])


def guide(cond_logits: Tensor, uncond_logits: Tensor, scale: float) -> Tensor:
    """uncond + scale * (cond - uncond), elementwise over logits of any equal shapes."""
    return uncond_logits + scale * (cond_logits - uncond_logits)
