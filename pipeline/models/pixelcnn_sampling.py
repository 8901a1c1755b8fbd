"""Sampling a PixelCNN (pixelcnn.py) in raster order at a cost per position that does not grow with the grid.

Recomputing the whole network for every position costs O(T^2) for T = grid^2 positions. But every value the
network computes at a position before p is final once the codes before it are: the horizontal stack and
attention at (i, j) see codes before (i, j) only, and the vertical stack's row i, used by the horizontal
stack of row i + 1, sees rows <= i. So a sampler keeps each layer's inputs and computes

- per call: the caption embedding and each layer's bias (caption, and condition per position);
- per row, once its codes are all known: each layer's vertical stack on that row, from the k//2 + 1 rows
  of its input up to it (O(grid) work);
- per position: each layer's horizontal stack from its input at (i, j - k//2 .. j), the row above's
  vertical part and the bias (O(1) work), and attention's query over a key/value cache that gains one
  memory row per position.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pipeline.models.autoregressive import KVCache

if TYPE_CHECKING:  # pixelcnn.py imports this module for PixelCNN.generate
    from pipeline.models.pixelcnn import PixelCNN


class PixelCNNSampler:
    """The logits of a PixelCNN one position at a time, for fixed captions (B, L) and condition codes
    (B, cg^2) or None. `logits()` gives the logits (B, K) at the next position p in raster order, equal to
    the full network's logits at p given the codes committed so far (up to rounding); `commit(codes)`
    fixes the codes (B,) at p and moves to p + 1.

    Each layer's inputs to the vertical and horizontal stacks are kept on the whole grid with k//2 zeros
    of padding on every side, so that a kernel's window is a plain slice. A value not computed yet is
    still zero there, and meets only masked (zero) weights: the rows below the current one in the
    vertical stack, the columns right of the current position (and, in the first layer, the position
    itself) in the horizontal stack."""

    def __init__(self, model: PixelCNN, text: Tensor, condition: Tensor | None) -> None:
        cfg, weight = model.cfg, model.embedding.weight
        g, pad, c = cfg.grid, cfg.kernel_size // 2, cfg.channels
        B = text.shape[0]
        self.model, self.grid, self.pad, self.position = model, g, pad, 0
        self.biases = [bias.expand(-1, -1, g, g)  # (B, 2C, g, g) each, views
                       for bias in model.biases(model.text(text), condition, (g, g))]
        padded = (B, c, g + 2 * pad, g + 2 * pad)
        # The code embeddings x feed both stacks of the first layer; layer i's outputs feed layer i + 1.
        self.x = weight.new_zeros(padded)
        self.v_in = [self.x] + [weight.new_zeros(padded) for _ in model.layers[1:]]
        self.h_in = [self.x] + [weight.new_zeros(padded) for _ in model.layers[1:]]
        # Each layer's vertical part of the horizontal stack on the current row; row 0 has no row above.
        self.v_to_h = [layer.vertical_to_horizontal(weight.new_zeros(B, 2 * c, 1, g))[:, :, 0]  # (B, 2C, g)
                       for layer in model.layers]
        # Memory row p of an attention layer is [h, x] at position p - 1, row 0 zeros (see CausalAttention):
        # T rows, as the last position is never one. `memory` holds the keys and values of those so far.
        self.caches = {name: KVCache(g * g) for name in model.attention}
        self.memory = {name: cache.append(*model.attention[name].keys_values(weight.new_zeros(B, 1, 2 * c)))
                       for name, cache in self.caches.items()}  # (B, nh, p + 1, hs) each
        self.attention_input: dict[str, Tensor] = {}  # per attention layer, its h at the position, (B, 1, C)

    def logits(self) -> Tensor:
        """Logits (B, K) at the current position; they do not change until `commit`."""
        (i, j), pad = divmod(self.position, self.grid), self.pad
        skips: Tensor | int = 0
        for index, layer in enumerate(self.model.layers):
            # (B, C, 1, k): the input at (i, j - k//2 .. j + k//2)
            window = self.h_in[index][:, :, i + pad:i + pad + 1, j:j + 2 * pad + 1]
            h, skip = layer.horizontal_at(window, self.v_to_h[index][:, :, j], self.biases[index][:, :, i, j])
            skips = skips + skip  # (B, C)
            if str(index) in self.caches:
                a = self._attend(str(index), h)
                h, skips = h + a, skips + a
            if index + 1 < len(self.model.layers):
                self.h_in[index + 1][:, :, i + pad, j + pad] = h
        return self.model.head(skips[:, :, None, None])[:, :, 0, 0]  # the head on a 1 x 1 grid

    def _attend(self, name: str, h: Tensor) -> Tensor:
        """Attention layer `name` at the current position from its input h (B, C) -> (B, C)."""
        attention = self.model.attention[name]
        h_seq = h[:, None]  # (B, 1, C)
        self.attention_input[name] = h_seq
        return attention.attend(attention.queries(h_seq), *self.memory[name], causal=False)[:, 0]

    def commit(self, codes: Tensor) -> None:
        """Fixes the codes (B,) at the current position and moves to the next."""
        (i, j), pad, g = divmod(self.position, self.grid), self.pad, self.grid
        x = self.model.embedding(codes)  # (B, C)
        self.x[:, :, i + pad, j + pad] = x
        self.position += 1
        if self.position < g * g:
            for name, cache in self.caches.items():
                memory = torch.cat([self.attention_input[name], x[:, None]], 2)  # (B, 1, 2C): [h, x] at p
                self.memory[name] = cache.append(*self.model.attention[name].keys_values(memory))
        if j == g - 1 and i < g - 1:
            self._finish_row(i)

    def _finish_row(self, i: int) -> None:
        """Computes every layer's vertical stack on row i, whose codes are all committed."""
        pad, g = self.pad, self.grid
        for index, layer in enumerate(self.model.layers):
            window = self.v_in[index][:, :, i:i + 2 * pad + 1]  # (B, C, k, g + 2 pad): rows i - k//2 .. i + k//2
            v, v_to_h = layer.vertical_row(window, self.biases[index][:, :, i:i + 1])
            self.v_to_h[index] = v_to_h[:, :, 0]  # (B, 2C, g)
            if index + 1 < len(self.model.layers):
                self.v_in[index + 1][:, :, i + pad, pad:pad + g] = v[:, :, 0]
