"""The `dalle` stage: DALL-E's transformer prior over [caption tokens | dVAE image tokens].

It trains from token shards only (written by `pretokenize`) and refuses shards made by another
dVAE than the one named in `dvae:` (the manifest's weights hash), whose decoder turns its samples
into images."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated

import torch
from torch import nn

from pipeline.data.precomputed import require
from pipeline.data.shapes import heldout_captions
from pipeline.data.text import make_tokenizer, vocab_size
from pipeline.engine.config import TrainConfig
from pipeline.engine.loop import exit_code, train
from pipeline.models.dalle import DALLE, DALLEConfig
from pipeline.models.dalle import flops_per_sample as dalle_flops
from pipeline.ranges import Range
from pipeline.runs import load_run
from pipeline.sampling import AutoregressiveOptions, seeded_generators

OUTPUT = "trainer.out_dir"


@dataclass
class Config(TrainConfig):
    model: DALLEConfig = field(default_factory=DALLEConfig)
    dvae: str = ""  # the dvae run that made the token shards (any one-grid autoencoder's run works)

    def validate(self) -> None:
        super().validate()
        if self.data.kind != "precomputed":
            raise ValueError("the prior trains from token shards: set data.kind to 'precomputed' (pretokenize's output)")
        if not self.dvae:
            raise ValueError("dvae is required: the dvae run that made the token shards")


def check_tokens(cfg: Config, trained_run: Path | None = None) -> dict:
    """The token shards' manifest (for a trained run, the copy it recorded), after checking it
    matches the dVAE and the model's shape."""
    manifest = require(cfg.data.shards, ("text_tokens", "image_tokens"), cfg.dvae, trained_run)
    info, producer = manifest["info"], manifest["producer"]
    if len(info["code_grids"]) != 1:
        raise ValueError(f"the prior models one code grid, but {cfg.dvae!r} makes {len(info['code_grids'])}")
    expected = {"model.image_grid": (cfg.model.image_grid, info["code_grids"][0]),
                "model.image_vocab_size": (cfg.model.image_vocab_size, info["codebook_size"]),
                "model.text_length": (cfg.model.text_length, producer["text_length"]),
                "model.text_vocab_size": (cfg.model.text_vocab_size, vocab_size(producer["tokenizer"]))}
    for key, (ours, theirs) in expected.items():
        if ours != theirs:
            raise ValueError(f"{key} is {ours} but the token shards have {theirs}")
    return manifest


def build_model(cfg: Config) -> nn.Module:
    return DALLE(cfg.model)


def flops_per_sample(cfg: Config) -> int:
    return dalle_flops(cfg.model)


def activation_shape(cfg: Config) -> tuple[int, int, int]:
    """(tokens, width, depth) for the activation estimate of `t2i describe`."""
    return cfg.model.sequence_length, cfg.model.width, cfg.model.depth


def logits_per_sample(cfg: Config) -> int:
    """The logits one sample's loss holds, for `t2i describe`: text[1:] over the text vocabulary
    and its pad tokens, and every image token over the codebook."""
    m = cfg.model
    return (m.text_length - 1) * (m.text_vocab_size + m.text_length) + m.image_grid ** 2 * m.image_vocab_size


@dataclass
class SamplerConfig(AutoregressiveOptions):
    """`t2i sample` options for a DALL-E prior (the `dalle` section of the sample stage's config)."""

    # Then draw among the most likely codes holding this much probability; null: no limit.
    top_p: Annotated[float, Range(0, 1, low_open=True)] | None = None


class Sampler:
    """Captions -> images: image tokens drawn one at a time through the prior's KV cache, decoded by
    the dVAE that made the token shards (pipeline/sampling.py has the contract)."""

    def __init__(self, prior: DALLE, cfg: Config, manifest: dict, options: SamplerConfig, device: torch.device) -> None:
        producer = manifest["producer"]
        self.prior, self.grid, self.options, self.device = prior.to(device).eval(), cfg.model.image_grid, options, device
        self.decoder = load_run(cfg.dvae, producer["stage"]).model.to(device)
        self.tokenize = make_tokenizer(producer["tokenizer"], producer["text_length"])

    @classmethod
    def from_run(cls, run: str, options: SamplerConfig, device: torch.device) -> Sampler:
        trained = load_run(run, "dalle")
        return cls(trained.model, trained.cfg, check_tokens(trained.cfg, trained.folder), options, device)

    @torch.no_grad()
    def sample(self, captions: list[str], seeds: list[int]) -> torch.Tensor:
        o = self.options
        tokens = self.prior.generate(self.tokenize(captions).to(self.device), temperature=o.temperature, top_k=o.top_k,
                                     top_p=o.top_p, guidance_scale=o.guidance_scale, generator=seeded_generators(seeds))
        return self.decoder.decode(tokens.view(-1, self.grid, self.grid))


def draw_images(cfg: Config, manifest: dict, model: DALLE, batch: dict) -> dict[str, torch.Tensor]:
    """Samples for 8 held-out captions (one per column, two rows), decoded by the dVAE."""
    sampler = Sampler(model, cfg, manifest, SamplerConfig(top_k=32), batch["image_tokens"].device)
    return {"samples": sampler.sample(heldout_captions(8) * 2, list(range(16)))}


def run(cfg: Config) -> int:
    manifest = check_tokens(cfg)
    images = partial(draw_images, cfg, manifest) if cfg.engine.zero_stage < 3 else None  # sharded weights cannot sample
    return exit_code(train(cfg, build_model, images))
