"""The `pretokenize` stage: image-text shards -> token shards, with a trained discrete autoencoder
(`autoencoder_stage`: dvae, vqvae or vqvae2), through the precompute machinery (pipeline/precompute.py).

Per sample: `KEY.txt` (the caption), `KEY.text.npy` (member `text_tokens`, the caption's tokens) and
`KEY.image.npy` (member `image_tokens`, the autoencoder's codes flattened in raster order; VQ-VAE-2's
top grid then its bottom grid), both uint16; the manifest's `info` gives the code grids' sides and
the codebook size. A codebook or tokenizer whose ids do not fit uint16 is refused before any work.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.data.precomputed import Member
from pipeline.data.text import portable, vocab_size
from pipeline.precompute import PrecomputeConfig, run_precompute
from pipeline.runs import load_run

OUTPUT = "out_dir"
CODE_STAGES = ("dvae", "vqvae", "vqvae2")


@dataclass
class Config(PrecomputeConfig):
    autoencoder: str = ""  # the output folder of a trained dvae, vqvae or vqvae2 stage
    autoencoder_stage: str = "dvae"  # which of those stages made it

    def validate(self) -> None:
        super().validate()
        if not self.autoencoder:
            raise ValueError("autoencoder is required")
        if self.autoencoder_stage not in CODE_STAGES:
            raise ValueError(f"autoencoder_stage must be one of {', '.join(CODE_STAGES)}, got {self.autoencoder_stage!r}")


class CodeEncoder:
    """A discrete autoencoder's codes of the images, and the captions' tokens."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        trained = load_run(cfg.autoencoder, cfg.autoencoder_stage)
        self.model = trained.model.to(device, memory_format=torch.channels_last)  # faster convolutions
        self.device, self.resolution = device, trained.cfg.data.resolution
        self.tokenizer, self.text_length = cfg.tokenizer, cfg.text_length
        codebook = trained.cfg.model.codebook_size
        grids = [grid.shape[-1] for grid in code_grids(self.model, torch.zeros(1, 3, self.resolution, self.resolution,
                                                                                device=device))]
        self.members = {
            "text_tokens": Member("uint16", (cfg.text_length,), "text.npy", vocab_size(cfg.tokenizer) - 1),
            "image_tokens": Member("uint16", (sum(side ** 2 for side in grids),), "image.npy", codebook - 1)}
        # What makes the values; moving the autoencoder's folder does not change them.
        self.producer = {"weights_sha256": trained.weights_sha256, "stage": cfg.autoencoder_stage,
                         "tokenizer": portable(cfg.tokenizer), "text_length": cfg.text_length}
        self.info = {"code_grids": grids, "codebook_size": codebook, "autoencoder": str(trained.folder.resolve())}

    @torch.no_grad()
    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"].to(self.device, memory_format=torch.channels_last)
        return {"text_tokens": batch["text_tokens"], "image_tokens": encode(self.model, images)}


def code_grids(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Images (B, 3, R, R) -> each grid of codes the autoencoder makes, (B, side, side)."""
    codes = model.encode(images)
    return codes if isinstance(codes, tuple) else (codes,)


def encode(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, R, R) -> the codes of every grid, flattened in raster order and concatenated,
    (B, sum of side ** 2): the layout of `image_tokens` (precomputed.split_codes inverts it)."""
    return torch.cat([grid.flatten(1) for grid in code_grids(model, images)], 1)


def run(cfg: Config) -> int:
    return run_precompute(cfg, lambda device: CodeEncoder(cfg, device))
