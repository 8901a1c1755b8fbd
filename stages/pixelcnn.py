"""The `pixelcnn` stage: a caption-conditioned gated PixelCNN prior over a VQ-VAE's codes.

It trains from token shards written by `pretokenize` with a vqvae or vqvae2 autoencoder and
refuses shards made by another one (the manifest's weights hash). `level` picks the grid: `single`
for a one-grid autoencoder; `top` or `bottom` for VQ-VAE-2, whose bottom prior is conditioned on
the top codes. `t2i sample` turns captions into images with it (and, for VQ-VAE-2, with the top
prior first: hierarchical sampling)."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from pipeline.data.precomputed import require, split_codes
from pipeline.data.shapes import heldout_captions
from pipeline.data.text import make_tokenizer, vocab_size
from pipeline.engine.config import TrainConfig
from pipeline.engine.loop import exit_code, train
from pipeline.models.pixelcnn import PixelCNN, PixelCNNConfig
from pipeline.runs import load_run
from pipeline.sampling import AutoregressiveOptions, seeded_generators

OUTPUT = "trainer.out_dir"
LEVELS = ("single", "top", "bottom")


@dataclass
class Config(TrainConfig):
    model: PixelCNNConfig = field(default_factory=PixelCNNConfig)
    autoencoder: str = ""  # the vqvae or vqvae2 run that made the token shards; it decodes the samples
    level: str = "single"  # single: a one-grid autoencoder; top / bottom: VQ-VAE-2's grids

    def validate(self) -> None:
        super().validate()
        if self.data.kind != "precomputed":
            raise ValueError("the prior trains from token shards: set data.kind to 'precomputed' (pretokenize's output)")
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


def check_tokens(cfg: Config, trained_run: Path | None = None) -> dict:
    """The token shards' manifest (for a trained run, the copy it recorded), after checking it
    matches the autoencoder and the model's shape."""
    manifest = require(cfg.data.shards, ("text_tokens", "image_tokens"), cfg.autoencoder, trained_run)
    info, producer = manifest["info"], manifest["producer"]
    grids = info["code_grids"]
    if (len(grids) == 1) != (cfg.level == "single"):
        raise ValueError(f"level is {cfg.level!r} but {cfg.autoencoder!r} makes {len(grids)} code grid(s)")
    grid = {"single": grids[0], "top": grids[0], "bottom": grids[-1]}[cfg.level]
    expected = {"model.grid": (cfg.model.grid, grid), "model.codebook_size": (cfg.model.codebook_size, info["codebook_size"]),
                "model.text.vocab_size": (cfg.model.text.vocab_size, vocab_size(producer["tokenizer"]))}
    if cfg.level == "bottom":
        expected |= {"model.condition_grid": (cfg.model.condition_grid, grids[0]),
                     "model.condition_codebook_size": (cfg.model.condition_codebook_size, info["codebook_size"])}
    for key, (ours, theirs) in expected.items():
        if ours != theirs:
            raise ValueError(f"{key} is {ours} but the token shards have {theirs}")
    if cfg.model.text.max_length < producer["text_length"]:
        raise ValueError(f"model.text.max_length is {cfg.model.text.max_length} but the captions have "
                         f"{producer['text_length']} tokens")
    return manifest


def build_model(cfg: Config) -> nn.Module:
    return GridPrior(cfg)


@dataclass
class SamplerConfig(AutoregressiveOptions):
    """`t2i sample` options for a PixelCNN prior (the `pixelcnn` section of the sample stage's config)."""

    top_run: str = ""  # VQ-VAE-2: the run sampled is the bottom prior; this top-level prior is sampled first


class Sampler:
    """Captions -> images: codes drawn in raster order by the prior (for VQ-VAE-2, the top prior's
    grid first, then the bottom prior's given it), decoded by the autoencoder that made the token
    shards (pipeline/sampling.py has the contract)."""

    def __init__(self, prior: GridPrior, cfg: Config, manifest: dict, options: SamplerConfig, device: torch.device,
                 top: GridPrior | None = None) -> None:
        producer = manifest["producer"]
        self.priors = [p.to(device).eval() for p in (top, prior) if p is not None]  # in the order they are sampled
        self.grids, self.options, self.device = manifest["info"]["code_grids"], options, device
        self.decoder = load_run(cfg.autoencoder, producer["stage"]).model.to(device)
        self.tokenize = make_tokenizer(producer["tokenizer"], producer["text_length"])

    @classmethod
    def from_run(cls, run: str, options: SamplerConfig, device: torch.device) -> Sampler:
        trained = load_run(run, "pixelcnn")
        manifest = check_tokens(trained.cfg, trained.folder)
        if trained.cfg.level == "single":
            return cls(trained.model, trained.cfg, manifest, options, device)
        if trained.cfg.level != "bottom" or not options.top_run:
            raise ValueError(f"{run}: a VQ-VAE-2 {trained.cfg.level} prior: sample with the bottom prior as run "
                             "and the top prior as pixelcnn.top_run")
        top = load_run(options.top_run, "pixelcnn")
        if top.cfg.level != "top" or check_tokens(top.cfg, top.folder)["producer"] != manifest["producer"]:
            raise ValueError(f"pixelcnn.top_run={options.top_run!r} is not a top-level prior over the same VQ-VAE-2's "
                             f"codes as {run!r}")
        return cls(trained.model, trained.cfg, manifest, options, device, top.model)

    @torch.no_grad()
    def sample(self, captions: list[str], seeds: list[int]) -> torch.Tensor:
        o, text = self.options, self.tokenize(captions).to(self.device)
        generators, codes = seeded_generators(seeds), None  # one stream per image, through every level
        for prior in self.priors:
            level = prior.prior.generate(text, condition=codes, temperature=o.temperature, top_k=o.top_k,
                                         guidance_scale=o.guidance_scale, generator=generators)  # (B, grid ** 2)
            codes = level if codes is None else torch.cat([codes, level], 1)
        return self.decoder.decode(*split_codes(codes, self.grids))


def draw_images(cfg: Config, manifest: dict, model: GridPrior, batch: dict) -> dict[str, torch.Tensor]:
    """Samples for 8 held-out captions (one per column, two rows), decoded by the autoencoder."""
    sampler = Sampler(model, cfg, manifest, SamplerConfig(top_k=32), batch["image_tokens"].device)
    return {"samples": sampler.sample(heldout_captions(8) * 2, list(range(16)))}


def run(cfg: Config) -> int:
    manifest = check_tokens(cfg)
    images = partial(draw_images, cfg, manifest) if cfg.level == "single" else None  # one VQ-VAE-2 level cannot decode
    return exit_code(train(cfg, build_model, images))
