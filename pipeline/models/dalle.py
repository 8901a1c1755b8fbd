"""The DALL-E transformer prior (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation"): a decoder-only
transformer over one stream s = [caption tokens (Lt = text_length) | image tokens (N = image_grid^2)], the
image tokens coming from a discrete VAE. Per sample, with w = text_loss_weight,

    loss = w * CE(text) + (1 - w) * CE(image),
    CE(text) = -mean_{t=1}^{Lt-1} log p(s_t | s_<t),   CE(image) = -mean_{t=Lt}^{Lt+N-1} log p(s_t | s_<t).

Position t predicts token t + 1: the input is text + image[:-1], the targets text[1:] + image, so the
last text position predicts the first image token. The first text token is never predicted: open_clip
starts every caption with the same token. A pad (token 0) at text position i is its own token,
text_vocab_size + i, as input and as target, so the text head predicts over text_vocab_size + Lt classes.

Text attends causally to text; image tokens attend to all text and causally to image tokens, densely or
("sparse") through DALL-E's row, column or convolutional masks, functions of the raster offset d >= 0
between two image tokens:
    row:    d <= image_grid (back to the same column of the previous row)
    column: d % image_grid == 0
    conv:   d = r * image_grid + c, 0 <= r <= k // 2, |c| <= k // 2: a causal k x k window, wrapping around
            the image's sides as the paper's does.
Layer i (0-based) is "conv" if last, else "column" if i % 4 == 2, else "row": the paper's "(i - 2) mod 4 = 0"
read with 0-based i. SDPA computes boolean masks densely: sparsity changes what is modelled, not the cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeline.engine.task import Task
from pipeline.models.autoregressive import Generators, KVCache, sample_logits
from pipeline.models.guidance import drop_captions, guide, with_null_captions
from pipeline.models.reduction import valid_mean
from pipeline.ranges import Fraction, PositiveInt, Range


@dataclass
class DALLEConfig:
    text_vocab_size: PositiveInt = 49408  # open_clip's BPE; token 0 is padding
    text_length: PositiveInt = 256
    image_vocab_size: PositiveInt = 8192
    image_grid: PositiveInt = 32  # image tokens per side
    width: PositiveInt = 512
    depth: PositiveInt = 8
    heads: PositiveInt = 8
    mlp_ratio: PositiveInt = 4
    dropout: Annotated[float, Range(0, 1, high_open=True)] = 0.0
    attention: Literal["dense", "sparse"] = "dense"
    conv_kernel: PositiveInt = 11  # odd, <= image_grid: side of the "conv" mask's window
    text_loss_weight: Fraction = 1 / 8  # w: the image loss has weight 1 - w
    caption_dropout: Fraction = 0.1  # per-sample probability in training of an all-padding caption

    def validate(self) -> None:
        if self.conv_kernel % 2 == 0 or self.conv_kernel > self.image_grid:
            raise ValueError(f"conv_kernel must be odd and <= image_grid, got {self.conv_kernel}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    @property
    def sequence_length(self) -> int:
        """Length of the model input: text + image[:-1]."""
        return self.text_length + self.image_grid ** 2 - 1


PRESETS: dict[str, DALLEConfig] = {
    "tiny": DALLEConfig(text_length=32, image_vocab_size=512, image_grid=8, width=128, depth=4, heads=4, conv_kernel=5),
    "1node": DALLEConfig(width=1024, depth=16, heads=16),
    "1.3B": DALLEConfig(width=1920, depth=24, heads=30),
    "12B": DALLEConfig(width=3968, depth=64, heads=62, attention="sparse"),
}


def layer_attention(cfg: DALLEConfig, layer: int) -> str:
    """The mask kind of a layer: "dense", or for sparse attention "row", "column" or "conv"."""
    if cfg.attention == "dense":
        return "dense"
    return "conv" if layer == cfg.depth - 1 else "column" if layer % 4 == 2 else "row"


def attention_mask(cfg: DALLEConfig, kind: str, device: torch.device | None = None) -> Tensor:
    """(T, T) bool over the input stream, True where query i may attend to key j (see the module
    docstring). Every query may attend to itself, so no row is empty."""
    i = torch.arange(cfg.sequence_length, device=device)
    d = i[:, None] - i[None, :]  # (T, T) query minus key position
    if kind == "dense":
        return d >= 0
    g, h = cfg.image_grid, cfg.conv_kernel // 2
    allowed = {"row": d <= g, "column": d % g == 0, "conv": ((d + h) // g <= h) & ((d + h) % g <= 2 * h)}[kind]
    image_pair = (i[:, None] >= cfg.text_length) & (i[None, :] >= cfg.text_length)
    return (d >= 0) & (allowed | ~image_pair)


def flops_per_sample(cfg: DALLEConfig) -> int:
    """Training (forward + backward = 3 x forward) matmul FLOPs for one sample: 6 per weight per position
    it multiplies (blocks at every position, each head at its own positions) plus 12 * depth * width * T^2
    for the attention scores and their weighted sum, the full T x T that SDPA computes under any mask,
    sparse included. Biases, norms and softmax are left out."""
    t, n = cfg.sequence_length, cfg.image_grid ** 2
    blocks = cfg.depth * (4 + 2 * cfg.mlp_ratio) * cfg.width ** 2
    heads = (cfg.text_length - 1) * (cfg.text_vocab_size + cfg.text_length) + n * cfg.image_vocab_size
    return 6 * (t * blocks + cfg.width * heads) + 12 * cfg.depth * cfg.width * t ** 2


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: DALLEConfig) -> None:
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.dropout
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor | None, cache: KVCache | None = None) -> Tensor:
        """x (B, n, C) at positions start..start+n, start = len(cache); mask (n, start + n), True
        where attention is allowed, or None for plain causal attention from position 0."""
        B, n, C = x.shape
        q, k, v = (t.view(B, n, self.heads, C // self.heads).transpose(1, 2)
                   for t in self.qkv(x).split(C, 2))  # (B, nh, n, hs)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nh, start + n, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, n, hs)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, n, C)))


class MLP(nn.Module):
    def __init__(self, cfg: DALLEConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.width, cfg.mlp_ratio * cfg.width)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.width, cfg.width)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: DALLEConfig) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.width), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.width), MLP(cfg)

    def forward(self, x: Tensor, mask: Tensor | None, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


class DALLE(Task):
    """The transformer prior p(text, image tokens); `generate` samples image tokens given a caption."""

    def __init__(self, cfg: DALLEConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.text_embedding = nn.Embedding(cfg.text_vocab_size + cfg.text_length, cfg.width)
        self.text_position = nn.Embedding(cfg.text_length, cfg.width)
        self.image_embedding = nn.Embedding(cfg.image_vocab_size, cfg.width)
        self.image_row = nn.Embedding(cfg.image_grid, cfg.width)
        self.image_column = nn.Embedding(cfg.image_grid, cfg.width)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.text_head = nn.Linear(cfg.width, cfg.text_vocab_size + cfg.text_length, bias=False)
        self.image_head = nn.Linear(cfg.width, cfg.image_vocab_size, bias=False)
        self.checkpointing = False
        self._masks: dict[tuple[str, torch.device], Tensor] = {}
        for name, p in self.named_parameters():  # GPT-2's init: residual projections shrink with depth
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.depth) if name.endswith("proj.weight") else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """When enabled, each Block recomputes its activations in the backward pass in training."""
        self.checkpointing = enabled

    def text_ids(self, text_tokens: Tensor) -> Tensor:
        """Tokens (B, Lt), 0 = pad -> ids (B, Lt) with a pad at position i as text_vocab_size + i."""
        position = torch.arange(text_tokens.shape[1], device=text_tokens.device)
        return torch.where(text_tokens == 0, self.cfg.text_vocab_size + position, text_tokens)

    def _embed_text(self, text_tokens: Tensor) -> Tensor:
        return self.dropout(self.text_embedding(self.text_ids(text_tokens)) + self.text_position.weight)

    def _embed_image(self, image_tokens: Tensor, start: int = 0) -> Tensor:
        """Image tokens (B, n) at raster indices start..start+n -> (B, n, W)."""
        index = torch.arange(start, start + image_tokens.shape[1], device=image_tokens.device)
        row, column = index // self.cfg.image_grid, index % self.cfg.image_grid
        return self.dropout(self.image_embedding(image_tokens) + self.image_row(row) + self.image_column(column))

    def _mask(self, layer: int, start: int, n: int, device: torch.device) -> Tensor | None:
        kind = layer_attention(self.cfg, layer)
        if kind == "dense" and start == 0:
            return None
        if (kind, device) not in self._masks:
            self._masks[kind, device] = attention_mask(self.cfg, kind, device)
        return self._masks[kind, device][start:start + n, :start + n]

    def _transform(self, x: Tensor, caches: list[KVCache] | None = None) -> Tensor:
        """Embeddings (B, n, W) of stream positions start..start+n -> final hidden states (B, n, W);
        start is the number of positions already in the caches (0 without), which gain these n."""
        start, n = len(caches[0]) if caches else 0, x.shape[1]
        for layer, block in enumerate(self.blocks):
            mask = self._mask(layer, start, n, x.device)
            if caches is not None:
                x = block(x, mask, caches[layer])
            elif self.checkpointing and self.training:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return self.ln_f(x)

    def logits(self, text_tokens: Tensor, image_tokens: Tensor, *, use_cache: bool = False) -> tuple[Tensor, Tensor]:
        """Text (B, Lt) and image tokens (B, N) -> logits predicting each token from those before it:
        text logits (B, Lt - 1, text_vocab_size + Lt) for text[1:], image logits (B, N, image_vocab_size)
        for the image. With use_cache the text runs in one pass and the image one token at a time
        through the KV cache, as in `generate`; the logits agree up to rounding."""
        if use_cache:
            caches = [KVCache(self.cfg.sequence_length) for _ in self.blocks]
            h = torch.cat([self._transform(self._embed_text(text_tokens), caches)]
                          + [self._transform(self._embed_image(image_tokens[:, k:k + 1], k), caches)
                             for k in range(image_tokens.shape[1] - 1)], 1)  # (B, T, W)
        else:
            h = self._transform(torch.cat([self._embed_text(text_tokens),
                                           self._embed_image(image_tokens[:, :-1])], 1))  # (B, T, W)
        lt = self.cfg.text_length
        return self.text_head(h[:, :lt - 1]), self.image_head(h[:, lt - 1:])

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """`loss` = w * loss_text + (1 - w) * loss_image, each the mean over valid samples (all, when
        batch has no "valid") of that sample's mean cross-entropy; `loss_text`, `loss_image` detached.
        In training each caption is replaced by all padding with probability caption_dropout."""
        text, image = batch["text_tokens"], batch["image_tokens"]  # (B, Lt), (B, N)
        valid = batch.get("valid", torch.ones(text.shape[0], dtype=torch.bool, device=text.device))  # (B,)
        if self.training:
            text = drop_captions(text, self.cfg.caption_dropout)
        text_logits, image_logits = self.logits(text, image)
        ce_text = F.cross_entropy(text_logits.float().transpose(1, 2), self.text_ids(text)[:, 1:],
                                  reduction="none").mean(1)  # (B,)
        ce_image = F.cross_entropy(image_logits.float().transpose(1, 2), image, reduction="none").mean(1)  # (B,)
        loss_text, loss_image = valid_mean(ce_text, valid), valid_mean(ce_image, valid)
        w = self.cfg.text_loss_weight
        return {"loss": w * loss_text + (1 - w) * loss_image,
                "loss_text": loss_text.detach(), "loss_image": loss_image.detach()}

    @torch.no_grad()
    def generate(self, text_tokens: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, guidance_scale: float = 1.0,
                 generator: Generators = None) -> Tensor:
        """Captions (B, Lt) -> image tokens (B, N) sampled one at a time through the KV cache (see
        `sample_logits`). guidance_scale != 1 is classifier-free guidance (see guidance.py): logits =
        uncond + guidance_scale * (cond - uncond), uncond from an all-padding caption. Dropout follows the
        mode: call eval() first."""
        guided = guidance_scale != 1
        if guided:
            text_tokens = with_null_captions(text_tokens)  # (2B, Lt)
        # The stream reaches sequence_length positions: the last image token is sampled, never fed.
        caches = [KVCache(self.cfg.sequence_length) for _ in self.blocks]
        h = self._transform(self._embed_text(text_tokens), caches)[:, -1]  # (B or 2B, W)
        image: list[Tensor] = []
        for k in range(self.cfg.image_grid ** 2):
            if k:
                step = image[-1].repeat(2) if guided else image[-1]  # (B or 2B,)
                h = self._transform(self._embed_image(step[:, None], k - 1), caches)[:, -1]
            logits = self.image_head(h).float()  # (B or 2B, V)
            if guided:
                logits = guide(*logits.chunk(2), guidance_scale)  # (B, V)
            image.append(sample_logits(logits, temperature, top_k, top_p, generator))  # (B,)
        return torch.stack(image, 1)
