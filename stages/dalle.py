"""The `dalle` stage: DALL-E's transformer prior over [caption tokens | dVAE image tokens].

It trains from token shards only (written by `pretokenize`) and refuses shards made by another
dVAE than the one named in `dvae:` (the manifest's weights hash), whose decoder turns its samples
into images."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from pipeline.data.shapes import heldout_captions
from pipeline.data.text import make_tokenizer, vocab_size
from pipeline.engine.config import TrainConfig
from pipeline.engine.loop import exit_code, train
from pipeline.models.dalle import DALLE, DALLEConfig
from pipeline.models.dalle import flops_per_sample as dalle_flops
from pipeline.runs import load_run
from stages.pretokenize import read_manifest

OUTPUT = "trainer.out_dir"


@dataclass
class Config(TrainConfig):
    model: DALLEConfig = field(default_factory=DALLEConfig)
    dvae: str = ""  # the dvae run that made the token shards (any one-grid autoencoder's run works)

    def validate(self) -> None:
        super().validate()
        if self.data.kind != "tokens":
            raise ValueError("the prior trains from token shards: set data.kind to 'tokens' (pretokenize's output)")
        if not self.dvae:
            raise ValueError("dvae is required: the dvae run that made the token shards")


def check_tokens(cfg: Config) -> dict:
    """The token shards' manifest, after checking it matches the dVAE and the model's shape."""
    manifest = read_manifest(cfg.data.shards, cfg.dvae)
    if len(manifest["code_grids"]) != 1:
        raise ValueError(f"the prior models one code grid, but {cfg.dvae!r} makes {len(manifest['code_grids'])}")
    expected = {"model.image_grid": (cfg.model.image_grid, manifest["code_grids"][0]),
                "model.image_vocab_size": (cfg.model.image_vocab_size, manifest["codebook_size"]),
                "model.text_length": (cfg.model.text_length, manifest["text_length"]),
                "model.text_vocab_size": (cfg.model.text_vocab_size, vocab_size(manifest["tokenizer"]))}
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


def draw_images(cfg: Config, manifest: dict, model: DALLE, batch: dict) -> dict[str, torch.Tensor]:
    """Samples for 8 held-out captions (one per column, two rows), decoded by the dVAE."""
    dvae = load_run(cfg.dvae, manifest["autoencoder_stage"]).model
    dvae.to(batch["image_tokens"].device)
    captions = heldout_captions(8, 64)
    text = make_tokenizer(manifest["tokenizer"], manifest["text_length"])(captions).to(batch["image_tokens"].device)
    generator = torch.Generator(text.device).manual_seed(0)
    grid = cfg.model.image_grid
    tokens = torch.cat([model.generate(text, generator=generator, top_k=32) for _ in range(2)])
    return {"samples": dvae.decode(tokens.view(-1, grid, grid))}


def run(cfg: Config) -> int:
    manifest = check_tokens(cfg)
    images = partial(draw_images, cfg, manifest) if cfg.engine.zero_stage < 3 else None  # sharded weights cannot sample
    return exit_code(train(cfg, build_model, images))
