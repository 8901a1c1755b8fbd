"""What the autoregressive priors (DALL-E's transformer, the PixelCNN) share when they sample: a
key/value cache that grows one position at a time into preallocated buffers, and drawing one token
per row of logits with temperature, top-k and top-p, from one random stream per image."""
from __future__ import annotations

import math

import torch
from torch import Tensor


class KVCache:
    """Keys and values (B, nh, t, hs) of the t positions one attention layer has seen, for sampling, in
    buffers of `capacity` positions allocated at the first append: each step copies its own keys and
    values only, where growing by concatenation would copy all earlier ones again."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.length = capacity, 0
        self.keys: Tensor | None = None  # (B, nh, capacity, hs), like the first keys appended
        self.values: Tensor | None = None

    def __len__(self) -> int:
        return self.length

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Writes the keys and values (B, nh, n, hs) of the next n positions; returns views (B, nh, t, hs)
        of all t so far. Raises ValueError past the capacity."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KVCache of capacity {self.capacity} holds {start} positions: "
                             f"cannot append {k.shape[2]} more")
        if self.keys is None:
            self.keys = k.new_empty(*k.shape[:2], self.capacity, k.shape[3])
            self.values = v.new_empty(*v.shape[:2], self.capacity, v.shape[3])
        self.keys[:, :, start:end], self.values[:, :, start:end] = k, v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


Generators = torch.Generator | list[torch.Generator] | None


def sample_logits(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: Generators = None) -> Tensor:
    """One token per row of logits (B, V) -> (B,). The logits are divided by the temperature, then
    limited to the top_k most likely tokens, then to the smallest set of them holding top_p of the
    probability (always keeping the most likely). Drawn with `generator`, or with one generator per
    row (a list, all on one device), so that a row's tokens do not depend on the rest of its batch;
    on the generators' device, so CPU generators reproduce the same tokens on any accelerator."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # mass before a token already exceeds top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), -math.inf)
    probs = logits.softmax(-1)
    if not isinstance(generator, list):  # one stream for the whole batch
        device = probs.device if generator is None else generator.device
        return torch.multinomial(probs.to(device), 1, generator=generator).squeeze(1).to(probs.device)
    on_device = probs.to(generator[0].device)  # one copy for all rows
    rows = [torch.multinomial(row[None], 1, generator=row_generator)
            for row, row_generator in zip(on_device, generator, strict=True)]
    return torch.cat(rows).squeeze(1).to(probs.device)
