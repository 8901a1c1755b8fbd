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
guidance at sampling time (guidance.py).

Sampling runs in raster order through `PixelCNNSampler` (pixelcnn_sampling.py), which computes each layer
once per position (the horizontal stack, attention) or once per row (the vertical stack) from cached
values, so that a position costs the same on any grid (attention aside, whose keys grow by one per
position); its logits are those of the full network up to rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.autoregressive import Generators, sample_logits
from pipeline.models.guidance import drop_captions, guide, with_null_captions
from pipeline.models.pixelcnn_sampling import PixelCNNSampler
from pipeline.models.reduction import valid_mean
from pipeline.models.text import TextEncoder, TextEncoderConfig
from pipeline.ranges import Fraction, NonNegativeInt, PositiveInt


@dataclass
class PixelCNNConfig:
    codebook_size: PositiveInt = 512
    grid: PositiveInt = 8  # codes per side
    channels: PositiveInt = 64
    layers: PositiveInt = 8
    kernel_size: PositiveInt = 3  # odd
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    condition_codebook_size: NonNegativeInt = 0  # codes of the spatial condition s; 0 = no spatial condition
    condition_grid: NonNegativeInt = 0  # its codes per side, upsampled (nearest) to grid
    attention: bool = False
    attention_every: PositiveInt = 4  # after layers attention_every - 1, 2 * attention_every - 1, ...
    heads: PositiveInt = 4
    caption_dropout: Fraction = 0.1  # per-sample probability in training of an all-padding caption

    def validate(self) -> None:
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        if (self.condition_codebook_size > 0) != (self.condition_grid > 0):
            raise ValueError("condition_codebook_size and condition_grid must both be 0 or both positive")
        if self.attention and self.channels % self.heads:
            raise ValueError(f"channels {self.channels} is not divisible by heads {self.heads}")
        if self.attention and self.attention_every > self.layers:
            raise ValueError(f"attention is on but attention_every ({self.attention_every}) exceeds layers "
                             f"({self.layers}): no layer would attend")


class MaskedConv2d(nn.Conv2d):
    """A 'same' convolution whose kernel is multiplied by a fixed 0/1 mask (kh, kw) of its shape."""
    mask: Tensor

    def __init__(self, c_in: int, c_out: int, mask: Tensor) -> None:
        kh, kw = mask.shape
        super().__init__(c_in, c_out, (kh, kw), padding=(kh // 2, kw // 2))
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)

    def unpadded(self, x: Tensor) -> Tensor:
        """The convolution of an input that holds its own padding: (B, C_in, h, w) -> (B, C_out, h - kh + 1,
        w - kw + 1), e.g. one output row from the kh input rows around it."""
        return F.conv2d(x, self.weight * self.mask, self.bias)

    def at(self, window: Tensor) -> Tensor:
        """The output at one position from its input window (B, C_in, kh, kw) -> (B, C_out), as the matrix
        product it is: on CPU a fraction of the cost of a convolution call."""
        return F.linear(window.flatten(1), (self.weight * self.mask).flatten(1), self.bias)


def pointwise(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A 1x1 convolution of x (B, C_in, h, w), or of values at single positions x (B, C_in) -> (B, C_out) as
    the matrix product it is: on CPU a fraction of the cost of a convolution call."""
    return conv(x) if x.dim() == 4 else F.linear(x, conv.weight.flatten(1), conv.bias)


def gate(x: Tensor) -> Tensor:
    """(B, 2C, ...) -> tanh(first half) * sigmoid(second half), (B, C, ...)."""
    f, g = x.chunk(2, 1)
    return torch.tanh(f) * torch.sigmoid(g)


class GatedLayer(nn.Module):
    """One layer of both stacks: (v, h, bias) -> (v', h', skip), all (B, C, grid, grid) but the bias
    (B, 2C, grid, grid), the conditioning V h shared by the two stacks' gates. `vertical_row` and
    `horizontal_at` compute the same one row or one position at a time, for sampling."""

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
        h, skip = self._horizontal_gate(h, self.horizontal(h), self.vertical_to_horizontal(v_shifted), bias)
        return gate(v_pre + bias), h, skip

    def _horizontal_gate(self, h: Tensor, h_pre: Tensor, v_to_h: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """The horizontal stack's (h', skip), (B, C, ...) each, from its input h (B, C, ...), its masked
        convolution h_pre, the shifted vertical stack's part v_to_h and the bias (B, 2C, ...)."""
        h_gated = gate(h_pre + v_to_h + bias)  # (B, C, ...)
        h_out = pointwise(self.horizontal_out, h_gated)
        return (h + h_out) if self.residual else h_out, pointwise(self.skip, h_gated)

    def vertical_row(self, v: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """Row i of the vertical stack from v (B, C, k, g + k - 1), its input's rows i - k//2 .. i + k//2 with
        k//2 columns of padding each side (the rows below i are masked: any finite values do), and the
        row's bias (B, 2C, 1, g) -> its output v' (B, C, 1, g) and, for row i + 1 of the horizontal stack,
        vertical_to_horizontal of its pre-activations (B, 2C, 1, g)."""
        v_pre = self.vertical.unpadded(v)  # (B, 2C, 1, g)
        return gate(v_pre + bias), self.vertical_to_horizontal(v_pre)

    def horizontal_at(self, h: Tensor, v_to_h: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """Position (i, j) of the horizontal stack from h (B, C, 1, k), its input at (i, j - k//2 .. j + k//2)
        (right of j masked, and j itself by mask 'A': any finite values do), v_to_h from `vertical_row`
        of row i - 1 at column j and the bias, (B, 2C) each -> (h', skip), (B, C) each."""
        return self._horizontal_gate(h[:, :, 0, h.shape[3] // 2], self.horizontal.at(h), v_to_h, bias)


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
        y = self.attend(self.queries(h_seq), *self.keys_values(memory), causal=True)  # (B, T, C)
        return y.transpose(1, 2).view(B, C, H, W)

    def _split_heads(self, t: Tensor) -> Tensor:
        B, n, C = t.shape
        return t.view(B, n, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, n, hs)

    def queries(self, h_seq: Tensor) -> Tensor:
        """The horizontal stack (B, n, C) -> queries (B, nh, n, hs)."""
        return self._split_heads(self.query(self.norm_query(h_seq)))

    def keys_values(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Memory rows [h, x] (B, n, 2C) -> keys and values (B, nh, n, hs) each."""
        k, v = self.key_value(self.norm_memory(memory)).chunk(2, 2)  # (B, n, C) each
        return self._split_heads(k), self._split_heads(v)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        """Queries (B, nh, n, hs) over keys and values (B, nh, t, hs) -> the output (B, n, C); causal: query
        i sees keys <= i (n = t), else every key."""
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, nh, n, hs)
        B, nh, n, hs = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, n, nh * hs))


class PixelCNN(nn.Module):
    """The caption-conditioned gated PixelCNN prior; `generate` samples codes in raster order."""

    def __init__(self, cfg: PixelCNNConfig) -> None:
        super().__init__()
        cfg.validate()
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

    def biases(self, y: Tensor, condition: Tensor | None, size: tuple[int, int]) -> list[Tensor]:
        """Each layer's conditioning V h on a grid of `size` from caption embeddings y (B, W) and condition
        codes (B, cg^2) or None: (B, 2C, 1, 1) from the caption, plus with a condition its per-position
        part, (B, 2C, g, g)."""
        if (condition is not None) != self.conditioned:
            raise ValueError(f"pass condition exactly when condition_grid > 0 (it is {self.cfg.condition_grid})")
        s = None
        if condition is not None:
            cg = self.cfg.condition_grid
            s = self.condition_embedding(condition.reshape(-1, cg, cg)).permute(0, 3, 1, 2)  # (B, C, cg, cg)
            s = F.interpolate(s, size=size, mode="nearest")  # (B, C, g, g)
        biases = []
        for i, text_bias in enumerate(self.text_bias):
            bias = text_bias(y)[:, :, None, None]  # (B, 2C, 1, 1)
            biases.append(bias if s is None else bias + self.condition_bias[i](s))
        return biases

    def _logits(self, codes: Tensor, y: Tensor, condition: Tensor | None) -> Tensor:
        """Codes (B, g, g), caption embeddings (B, W), condition codes (B, cg^2) or None -> (B, K, g, g)."""
        biases = self.biases(y, condition, codes.shape[1:])
        x = self.embedding(codes).permute(0, 3, 1, 2)  # (B, C, g, g)
        v, h, skips = x, x, 0
        for i, (layer, bias) in enumerate(zip(self.layers, biases)):
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
        if self.training:
            text = drop_captions(text, self.cfg.caption_dropout)
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
        """Captions (B, L) -> codes (B, grid^2), sampled in raster order through a PixelCNNSampler (see
        dalle.sample_logits for temperature, top_k and generator). guidance_scale != 1 is classifier-free
        guidance (see guidance.py): logits = uncond + guidance_scale * (cond - uncond), uncond from an
        all-padding caption."""
        guided = guidance_scale != 1
        if guided:
            text = with_null_captions(text)  # (2B, L)
            condition = None if condition is None else condition.repeat(2, 1)
        sampler = PixelCNNSampler(self, text, condition)
        codes: list[Tensor] = []
        for _ in range(self.cfg.grid ** 2):
            logits = sampler.logits().float()  # (B or 2B, K)
            if guided:
                logits = guide(*logits.chunk(2), guidance_scale)  # (B, K)
            codes.append(sample_logits(logits, temperature, top_k, generator=generator))  # (B,)
            sampler.commit(codes[-1].repeat(2) if guided else codes[-1])
        return torch.stack(codes, 1)
