"""The `ldm` stage: text-to-image latent diffusion (pipeline/models/ldm.py), trained on the latent
shards of the `latents` stage; shards made by another autoencoder than `autoencoder:` (the
manifest's weights hash) are refused. The text encoder is a CLIP text transformer of the config's
sizes over the shards' tokenizer, or a pretrained transformers `CLIPTextModel` from a local folder
(`model.text.pretrained: hf:/path`), trained with the UNet or frozen.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from pipeline.data.precomputed import require
from pipeline.data.text import vocab_size
from pipeline.engine.config import TrainConfig
from pipeline.engine.loop import exit_code, train
from pipeline.models.ldm import LatentDiffusion, LDMConfig, PretrainedTextEncoder

OUTPUT = "trainer.out_dir"
LATENT_MEMBERS = ("text_tokens", "latent_mean", "latent_logvar")


@dataclass
class Config(TrainConfig):
    model: LDMConfig = field(default_factory=LDMConfig)
    autoencoder: str = ""  # the kl_autoencoder run that made the latent shards

    def validate(self) -> None:
        super().validate()
        if self.data.kind != "precomputed":
            raise ValueError("latent diffusion trains from latent shards: set data.kind to 'precomputed' (the latents "
                             "stage's output)")
        if not self.autoencoder:
            raise ValueError("autoencoder is required: the kl_autoencoder run that made the latent shards")


def text_encoder(cfg: Config, producer: dict) -> nn.Module:
    """The configured text encoder for the shards' tokenizer and caption length."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text, tokenizer, length = cfg.model.text, producer["tokenizer"], producer["text_length"]
    if not text.pretrained:
        return CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size(tokenizer), hidden_size=text.width,
                                            intermediate_size=4 * text.width, num_hidden_layers=text.layers,
                                            num_attention_heads=text.heads, max_position_embeddings=length,
                                            pad_token_id=0))
    kind, _, folder = text.pretrained.partition(":")
    if kind != "hf" or not folder:
        raise ValueError(f"model.text.pretrained must look like 'hf:/local/folder', got {text.pretrained!r}")
    if not tokenizer.startswith(("hf:", "open_clip:")):
        raise ValueError(f"a pretrained text encoder reads CLIP's token ids: the latent shards' tokenizer {tokenizer!r} "
                         "makes other ones (write them with an hf: or open_clip: tokenizer)")
    encoder = CLIPTextModel.from_pretrained(folder, local_files_only=True)
    if encoder.config.max_position_embeddings < length:
        raise ValueError(f"{folder} reads at most {encoder.config.max_position_embeddings} tokens, the shards hold {length}")
    return PretrainedTextEncoder(encoder, id_offset=1 if tokenizer.startswith("hf:") else 0)


def build_model(cfg: Config) -> nn.Module:
    manifest = require(cfg.data.shards, LATENT_MEMBERS, cfg.autoencoder)
    info = manifest["info"]
    return LatentDiffusion(cfg.model, text_encoder(cfg, manifest["producer"]), tuple(info["latent_shape"]),
                           info["scale_factor"])


def run(cfg: Config) -> int:
    require(cfg.data.shards, LATENT_MEMBERS, cfg.autoencoder)  # before any process group starts
    return exit_code(train(cfg, build_model))
