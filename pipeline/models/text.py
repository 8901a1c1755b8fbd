"""Caption encoder for the conditional models: a small Transformer encoder (Vaswani et al. 2017,
"Attention Is All You Need") over open_clip BPE tokens, pooled into one vector y per caption.
It has no loss of its own; it is trained through the loss of the model that uses it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.ranges import PositiveInt


@dataclass
class TextEncoderConfig:
    vocab_size: PositiveInt = 49408  # open_clip's BPE; token 0 is padding
    width: PositiveInt = 64
    layers: PositiveInt = 1
    heads: PositiveInt = 4
    max_length: PositiveInt = 77

    def validate(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")


class TextEncoder(nn.Module):
    """Tokens (B, L), L <= max_length, 0 = padding -> caption embedding (B, width): the mean of the
    Transformer's outputs at the non-padding positions, which padding never influences."""
    no_weight_decay = ("positional_embedding",)  # an embedding, though not an nn.Embedding (engine/task.py)

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(cfg.max_length, cfg.width))
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        # Nested tensors do not support norm_first layers; attention runs through SDPA either way.
        self.transformer = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, tokens: Tensor) -> Tensor:
        padding = tokens == 0  # (B, L)
        # Position 0 holds a real token (open_clip's start token) in any tokenized caption; keeping it
        # unmasked gives an all-padding row a finite embedding instead of NaN attention.
        padding[:, 0] = False
        h = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]  # (B, L, W)
        h = self.norm(self.transformer(h, src_key_padding_mask=padding))  # (B, L, W)
        keep = (~padding).unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        return (h * keep).sum(1) / keep.sum(1)  # (B, W)
