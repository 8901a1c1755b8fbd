"""The `cvae` stage: a conditional VAE on the caption, trained with the hybrid CVAE/GSNN loss."""
from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from pipeline.data.shapes import heldout_captions
from pipeline.data.text import make_tokenizer, vocab_size
from pipeline.engine.config import TrainConfig
from pipeline.engine.loop import exit_code, train
from pipeline.models.cvae import CVAE, CVAEConfig

OUTPUT = "trainer.out_dir"
@dataclass
class Config(TrainConfig):
    model: CVAEConfig = field(default_factory=CVAEConfig)

    def validate(self) -> None:
        super().validate()
        if not self.data.tokenizer:
            raise ValueError("the CVAE is conditioned on captions: set data.tokenizer (e.g. open_clip:ViT-B-32)")
        if self.data.text_length > self.model.text.max_length:
            raise ValueError(f"data.text_length ({self.data.text_length}) exceeds model.text.max_length "
                             f"({self.model.text.max_length})")
        if vocab_size(self.data.tokenizer) > self.model.text.vocab_size:
            raise ValueError(f"model.text.vocab_size ({self.model.text.vocab_size}) is smaller than the "
                             f"{vocab_size(self.data.tokenizer)} ids of data.tokenizer {self.data.tokenizer!r}")


def build_model(cfg: Config) -> nn.Module:
    return CVAE(cfg.model)


def draw_images(cfg: Config, model: CVAE, batch: dict) -> dict[str, torch.Tensor]:
    """Reconstructions, and for 8 held-out captions 4 samples each (one caption per column)."""
    originals, tokens = batch["image"][:8], batch["tokens"][:8]
    captions = heldout_captions(8, cfg.data.resolution)
    held_tokens = make_tokenizer(cfg.data.tokenizer, cfg.data.text_length)(captions).to(originals.device)
    generator = torch.Generator(originals.device).manual_seed(0)
    samples = torch.cat([model.sample(held_tokens, generator) for _ in range(4)])
    return {"reconstructions": torch.cat([originals, model.reconstruct(originals, tokens)]), "samples": samples}


def run(cfg: Config) -> int:
    code = exit_code(train(cfg, build_model, partial(draw_images, cfg)))
    if int(os.environ.get("RANK", 0)) == 0:  # the report's note on what the sample grid shows
        captions = "".join(f"<li>{html.escape(caption)}</li>" for caption in heldout_captions(8, cfg.data.resolution))
        Path(cfg.trainer.out_dir, "report.html").write_text(
            f"<p>samples: one held-out caption per column, left to right:</p><ol>{captions}</ol>")
    return code
