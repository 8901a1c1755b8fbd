"""The gated PixelCNN prior over a grid of discrete codes (van den Oord et al. 2016, "Conditional Image
Generation with PixelCNN Decoders"), conditioned on a caption, as the VQ-VAE priors use it.

With c the codes of a grid x grid image in raster order (T = grid^2), y the caption and s an optional
second code grid (e.g. the VQ-VAE-2 top codes when this is the bottom prior), per sample, in nats,

    loss = -1/T sum_{p=1}^{T} log p(c_p | c_<p, y, s).

Every layer is a gated unit tanh(W_f * x + V_f h) * sigmoid(W_g * x + V_g h), h = the caption's
TextEncoder embedding (a per-channel bias) plus, with s, a 1x1 convolution of s embedded and upsampled
to the grid (a per-position bias: position p sees s where it sees codes, and at p itself; VQ-VAE-2
widens this with a conditioning stack). Two stacks of masked convolutions remove the blind spot of the
original PixelCNN: the vertical stack sees the rows above and the current row (a k x k kernel with its
lower rows masked), the horizontal stack the current row up to the current position (a 1 x k kernel
with its right side masked; mask 'A' in the first layer also masks the current position, 'B' in the
others keeps it). The vertical stack's pre-activations, shifted down one row so that row i sees only
rows < i, feed the horizontal stack, which therefore sees every position above, to the right as well
as to the left. The horizontal stack has residual (from the second layer, as the first one's input
holds the current code) and skip connections; the summed skips give the logits.

Optionally after every `attention_every` layers the horizontal stack attends over the flattened grid
(as PixelSNAIL, Chen et al. 2018): keys and values from the horizontal stack and the code embeddings,
shifted one step along raster order so that the causal mask leaves position p only positions < p; the
attention output joins the horizontal stack and the skips.

In training each caption becomes all padding with probability caption_dropout, for classifier-free
guidance at sampling time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.dalle import Generators, sample_logits
from pipeline.models.text import TextEncoder, TextEncoderConfig
from pipeline.models.vae import valid_mean


@dataclass
class PixelCNNConfig:
    codebook_size: int = 512
    grid: int = 8  # codes per side
    channels: int = 64
    layers: int = 8
    kernel_size: int = 3  # odd
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    condition_codebook_size: int = 0  # codes of the spatial condition s; 0 = no spatial condition
    condition_grid: int = 0  # its codes per side, upsampled (nearest) to grid
    attention: bool = False
    attention_every: int = 4  # after layers attention_every - 1, 2 * attention_every - 1, ...
    heads: int = 4
    caption_dropout: float = 0.1  # per-sample probability in training of an all-padding caption


class MaskedConv2d(nn.Conv2d):
    """A 'same' convolution whose kernel is multiplied by a fixed 0/1 mask (kh, kw) of its shape."""
    mask: Tensor

    def __init__(self, c_in: int, c_out: int, mask: Tensor) -> None:
        kh, kw = mask.shape
        super().__init__(c_in, c_out, (kh, kw), padding=(kh // 2, kw // 2))
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


def gate(x: Tensor) -> Tensor:
    """(B, 2C, h, w) -> tanh(first half) * sigmoid(second half), (B, C, h, w)."""
    f, g = x.chunk(2, 1)
    return torch.tanh(f) * torch.sigmoid(g)


class GatedLayer(nn.Module):
    """One layer of both stacks: (v, h, bias) -> (v', h', skip), all (B, C, grid, grid) but the bias
    (B, 2C, grid, grid), the conditioning V h shared by the two stacks' gates."""

    def __init__(self, channels: int, kernel_size: int, mask_type: str) -> None:
        super().__init__()
        k, c = kernel_size, channels
        vertical = torch.ones(k, k)
        vertical[k // 2 + 1:] = 0  # rows below the current one
        horizontal = torch.ones(1, k)
        horizontal[:, k // 2 + (mask_type == "B"):] = 0  # to the right, and 'A' the current position
        self.residual = mask_type == "B"
        self.vertical = MaskedConv2d(c, 2 * c, vertical)
        self.horizontal = MaskedConv2d(c, 2 * c, horizontal)
        self.vertical_to_horizontal = nn.Conv2d(2 * c, 2 * c, 1)
        self.horizontal_out = nn.Conv2d(c, c, 1)
        self.skip = nn.Conv2d(c, c, 1)

    def forward(self, v: Tensor, h: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        v_pre = self.vertical(v)  # (B, 2C, g, g): rows <= i
        # Down one row, row i holds rows < i only, so the horizontal stack may see all of it.
        v_shifted = F.pad(v_pre, (0, 0, 1, 0))[:, :, :-1]  # (B, 2C, g, g)
        h_gated = gate(self.horizontal(h) + self.vertical_to_horizontal(v_shifted) + bias)  # (B, C, g, g)
        h_out = self.horizontal_out(h_gated)
        return gate(v_pre + bias), (h + h_out) if self.residual else h_out, self.skip(h_gated)


class CausalAttention(nn.Module):
    """Multi-head attention of the horizontal stack over the flattened grid, (h, x) -> its output,
    (B, C, grid, grid) each: queries from h, keys and values from [h, x] one raster step behind."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_query, self.norm_memory = nn.LayerNorm(channels), nn.LayerNorm(2 * channels)
        self.query = nn.Linear(channels, channels)
        self.key_value = nn.Linear(2 * channels, 2 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, h: Tensor, x: Tensor) -> Tensor:
        B, C, H, W = h.shape
        h_seq = h.flatten(2).transpose(1, 2)  # (B, T, C)
        memory = torch.cat([h_seq, x.flatten(2).transpose(1, 2)], 2)  # (B, T, 2C)
        # x at p is code p itself: one step behind, memory row p holds position p - 1 (row 0 zeros,
        # a key every query may attend to), and the causal mask (j <= p) leaves positions < p only.
        memory = F.pad(memory, (0, 0, 1, 0))[:, :-1]
        k, v = self.key_value(self.norm_memory(memory)).chunk(2, 2)  # (B, T, C) each
        q = self.query(self.norm_query(h_seq))
        q, k, v = (t.view(B, H * W, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, H * W, C)
        return self.proj(y).transpose(1, 2).view(B, C, H, W)


class PixelCNN(nn.Module):
    """The caption-conditioned gated PixelCNN prior; `generate` samples codes in raster order."""

    def __init__(self, cfg: PixelCNNConfig) -> None:
        super().__init__()
        if cfg.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {cfg.kernel_size}")
        if (cfg.condition_codebook_size > 0) != (cfg.condition_grid > 0):
            raise ValueError("condition_codebook_size and condition_grid must both be 0 or both positive")
        if cfg.attention and cfg.channels % cfg.heads:
            raise ValueError(f"channels {cfg.channels} is not divisible by heads {cfg.heads}")
        self.cfg = cfg
        c = cfg.channels
        self.embedding = nn.Embedding(cfg.codebook_size, c)
        self.text = TextEncoder(cfg.text)
        self.text_bias = nn.ModuleList(nn.Linear(cfg.text.width, 2 * c) for _ in range(cfg.layers))
        self.conditioned = cfg.condition_grid > 0
        if self.conditioned:
            self.condition_embedding = nn.Embedding(cfg.condition_codebook_size, c)
            self.condition_bias = nn.ModuleList(nn.Conv2d(c, 2 * c, 1) for _ in range(cfg.layers))
        self.layers = nn.ModuleList(GatedLayer(c, cfg.kernel_size, "A" if i == 0 else "B") for i in range(cfg.layers))
        self.attention = nn.ModuleDict({
            str(i): CausalAttention(c, cfg.heads)
            for i in range(cfg.attention_every - 1, cfg.layers, cfg.attention_every)} if cfg.attention else {})
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 1), nn.ReLU(), nn.Conv2d(c, cfg.codebook_size, 1))

    def _logits(self, codes: Tensor, y: Tensor, condition: Tensor | None) -> Tensor:
        """Codes (B, g, g), caption embeddings (B, W), condition codes (B, cg^2) or None -> (B, K, g, g)."""
        if (condition is not None) != self.conditioned:
            raise ValueError(f"pass condition exactly when condition_grid > 0 (it is {self.cfg.condition_grid})")
        x = self.embedding(codes).permute(0, 3, 1, 2)  # (B, C, g, g)
        s = None
        if condition is not None:
            cg = self.cfg.condition_grid
            s = self.condition_embedding(condition.reshape(-1, cg, cg)).permute(0, 3, 1, 2)  # (B, C, cg, cg)
            s = F.interpolate(s, size=codes.shape[1:], mode="nearest")  # (B, C, g, g)
        v, h, skips = x, x, 0
        for i, layer in enumerate(self.layers):
            bias = self.text_bias[i](y)[:, :, None, None]  # (B, 2C, 1, 1)
            if s is not None:
                bias = bias + self.condition_bias[i](s)  # (B, 2C, g, g)
            v, h, skip = layer(v, h, bias)
            skips = skips + skip
            if str(i) in self.attention:
                # Like a gated layer it adds to the stack and to the skips, so that attention after the
                # last layer still reaches the logits.
                a = self.attention[str(i)](h, x)  # (B, C, g, g)
                h, skips = h + a, skips + a
        return self.head(skips)  # (B, K, g, g)

    def logits(self, codes: Tensor, text: Tensor, condition: Tensor | None = None) -> Tensor:
        """Codes (B, grid, grid), caption tokens (B, L), condition codes (B, condition_grid^2) when
        conditioned -> logits (B, codebook_size, grid, grid), each predicting its code from those before it."""
        return self._logits(codes, self.text(text), condition)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """`loss` = mean over valid samples (all, when batch has no "valid") of the mean NLL per code in
        nats; `bits_per_code` the same in bits, detached."""
        codes, text = batch["image_tokens"], batch["text_tokens"]  # (B, T), (B, L)
        valid = batch.get("valid", torch.ones(text.shape[0], dtype=torch.bool, device=text.device))  # (B,)
        if self.training and self.cfg.caption_dropout > 0:
            drop = torch.rand(text.shape[0], device=text.device) < self.cfg.caption_dropout  # (B,)
            text = text.masked_fill(drop[:, None], 0)
        grid = self.cfg.grid
        codes = codes.view(-1, grid, grid)
        logits = self.logits(codes, text, batch.get("condition_tokens"))  # (B, K, g, g)
        nll = F.cross_entropy(logits.float(), codes, reduction="none").flatten(1).mean(1)  # (B,)
        loss = valid_mean(nll, valid)
        return {"loss": loss, "bits_per_code": loss.detach() / math.log(2)}

    @torch.no_grad()
    def generate(self, text: Tensor, condition: Tensor | None = None, temperature: float = 1.0,
                 top_k: int | None = None, guidance_scale: float = 1.0,
                 generator: Generators = None) -> Tensor:
        """Captions (B, L) -> codes (B, grid^2), sampled in raster order, the whole net recomputed per
        position (see dalle.sample_logits for temperature, top_k and generator). guidance_scale != 1 is
        classifier-free guidance: logits = uncond + guidance_scale * (cond - uncond), uncond from an
        all-padding caption."""
        guided = guidance_scale != 1
        B, grid = text.shape[0], self.cfg.grid
        if guided:
            text = torch.cat([text, torch.zeros_like(text)])  # (2B, L)
            condition = None if condition is None else torch.cat([condition, condition])
        y = self.text(text)  # (B or 2B, W)
        codes = torch.zeros(B, grid, grid, dtype=torch.long, device=text.device)
        for p in range(grid * grid):
            i, j = divmod(p, grid)
            logits = self._logits(codes.repeat(2, 1, 1) if guided else codes, y, condition)[:, :, i, j].float()
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + guidance_scale * (cond - uncond)  # (B, K)
            codes[:, i, j] = sample_logits(logits, temperature, top_k, generator=generator)
        return codes.flatten(1)
