"""Reductions over a batch shared by the model families: padding samples (`valid` False) fill the
last batch of an epoch so that every rank steps together, and must not count."""
from __future__ import annotations

import torch
from torch import Tensor


def valid_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of per-sample `values` (B,) over samples whose `valid` is True; 0 when none is."""
    return torch.where(valid, values, 0).sum() / valid.sum().clamp(min=1)
