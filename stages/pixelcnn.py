"""The `pixelcnn` stage: a caption-conditioned gated PixelCNN prior over a VQ-VAE's codes.

It trains from token shards written by `pretokenize` with a vqvae or vqvae2 autoencoder and
refuses shards made by another one (the manifest's weights hash). `level` picks the grid: `single`
for a one-grid autoencoder; `top` or `bottom` for VQ-VAE-2, whose bottom prior is conditioned on
the top codes. `t2i sample` turns captions into images with it (and, for VQ-VAE-2, with the top
prior first: hierarchical sampling)."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from pipeline.data.shapes import heldout_captions
from pipeline.data.text import make_tokenizer, vocab_size
from pipeline.engine.config import TrainConfig
from pipeline.engine.loop import exit_code, train
from pipeline.models.pixelcnn import PixelCNN, PixelCNNConfig
from pipeline.runs import load_run
from stages.pretokenize import read_manifest

OUTPUT = "trainer.out_dir"
LEVELS = ("single", "top", "bottom")


@dataclass
class Config(TrainConfig):
    model: PixelCNNConfig = field(default_factory=PixelCNNConfig)
    autoencoder: str = ""  # the vqvae or vqvae2 run that made the token shards; it decodes the samples
    level: str = "single"  # single: a one-grid autoencoder; top / bottom: VQ-VAE-2's grids

    def validate(self) -> None:
        super().validate()
        if self.data.kind != "tokens":
            raise ValueError("the prior trains from token shards: set data.kind to 'tokens' (pretokenize's output)")
        if not self.autoencoder:
            raise ValueError("autoencoder is required: the run that made the token shards")
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        if (self.level == "bottom") != (self.model.condition_grid > 0):
            raise ValueError("model.condition_grid must be set (to the top grid's side) exactly for level: bottom")


class GridPrior(nn.Module):
    """The PixelCNN over one grid of the token shards' codes, which hold VQ-VAE-2's top grid first,
    then its bottom grid; the bottom prior reads the top codes as its condition."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.prior = PixelCNN(cfg.model)
        self.level = cfg.level

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        codes, grid, top = batch["image_tokens"], self.prior.cfg.grid, self.prior.cfg.condition_grid ** 2
        if self.level == "bottom":
            batch = {**batch, "image_tokens": codes[:, top:top + grid ** 2], "condition_tokens": codes[:, :top]}
        else:
            batch = {**batch, "image_tokens": codes[:, :grid ** 2]}
        return self.prior(batch)


def check_tokens(cfg: Config) -> dict:
    """The token shards' manifest, after checking it matches the autoencoder and the model's shape."""
    manifest = read_manifest(cfg.data.shards, cfg.autoencoder)
    grids = manifest["code_grids"]
    if (len(grids) == 1) != (cfg.level == "single"):
        raise ValueError(f"level is {cfg.level!r} but {cfg.autoencoder!r} makes {len(grids)} code grid(s)")
    grid = {"single": grids[0], "top": grids[0], "bottom": grids[-1]}[cfg.level]
    expected = {"model.grid": (cfg.model.grid, grid), "model.codebook_size": (cfg.model.codebook_size, manifest["codebook_size"]),
                "model.text.vocab_size": (cfg.model.text.vocab_size, vocab_size(manifest["tokenizer"]))}
    if cfg.level == "bottom":
        expected |= {"model.condition_grid": (cfg.model.condition_grid, grids[0]),
                     "model.condition_codebook_size": (cfg.model.condition_codebook_size, manifest["codebook_size"])}
    for key, (ours, theirs) in expected.items():
        if ours != theirs:
            raise ValueError(f"{key} is {ours} but the token shards have {theirs}")
    if cfg.model.text.max_length < manifest["text_length"]:
        raise ValueError(f"model.text.max_length is {cfg.model.text.max_length} but the captions have "
                         f"{manifest['text_length']} tokens")
    return manifest


def build_model(cfg: Config) -> nn.Module:
    return GridPrior(cfg)


def draw_images(cfg: Config, manifest: dict, model: GridPrior, batch: dict) -> dict[str, torch.Tensor]:
    """Samples for 8 held-out captions (one per column, two rows), decoded by the autoencoder."""
    autoencoder = load_run(cfg.autoencoder, manifest["autoencoder_stage"]).model
    device = batch["image_tokens"].device
    text = make_tokenizer(manifest["tokenizer"], manifest["text_length"])(heldout_captions(8, 64)).to(device)
    generator = torch.Generator(device).manual_seed(0)
    codes = torch.cat([model.prior.generate(text, generator=generator, top_k=32) for _ in range(2)])
    grid = cfg.model.grid
    return {"samples": autoencoder.to(device).decode(codes.view(-1, grid, grid))}


def run(cfg: Config) -> int:
    manifest = check_tokens(cfg)
    images = partial(draw_images, cfg, manifest) if cfg.level == "single" else None  # one VQ-VAE-2 level cannot decode
    return exit_code(train(cfg, build_model, images))
