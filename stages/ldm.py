"""The `ldm` stage: text-to-image latent diffusion (pipeline/models/ldm.py), trained on the latent
shards of the `latents` stage; shards made by another autoencoder than `autoencoder:` (the
manifest's weights hash) are refused. The text encoder is a CLIP text transformer of the config's
sizes over the shards' tokenizer, or a pretrained transformers `CLIPTextModel` from a local folder
(`model.text.pretrained: hf:/path`), trained with the UNet or frozen.

Its `Sampler` (`t2i sample`, the `ldm` section): one noise seed per image, a diffusers scheduler
(ddim, dpm++, euler) for `steps` steps, classifier-free guidance against the empty caption or a
negative one, and the autoencoder's decoder.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.data.precomputed import require
from pipeline.data.text import make_tokenizer, vocab_size
from pipeline.engine.config import TrainConfig
from pipeline.engine.loop import exit_code, train
from pipeline.models.diffusion_sampling import SchedulerName, denoise, initial_noise, make_scheduler
from pipeline.models.guidance import guide
from pipeline.models.ldm import LatentDiffusion, LDMConfig, PretrainedTextEncoder
from pipeline.ranges import NonNegativeFloat, PositiveInt
from pipeline.runs import load_run
from pipeline.sampling import seeded_generators

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


@dataclass
class SamplerConfig:
    """`t2i sample` options for a latent diffusion run (the `ldm` section of the sample stage's config)."""

    scheduler: SchedulerName = "dpm++"
    steps: PositiveInt = 25
    guidance_scale: NonNegativeFloat = 5.0  # classifier-free guidance; 1: none, 0: the caption ignored
    negative_caption: str = ""  # guide away from this caption instead of the empty one


class Sampler:
    """Captions -> images: latents denoised from per-image noise by a diffusers scheduler, guided,
    then decoded by the autoencoder that made the latent shards (pipeline/sampling.py has the contract)."""

    def __init__(self, model: LatentDiffusion, cfg: Config, manifest: dict, options: SamplerConfig,
                 device: torch.device) -> None:
        producer = manifest["producer"]
        self.model, self.options, self.device = model.to(device).eval(), options, device
        self.decoder = load_run(cfg.autoencoder, "kl_autoencoder").model.to(device)
        self.tokenize = make_tokenizer(producer["tokenizer"], producer["text_length"])
        self.latent_shape = tuple(manifest["info"]["latent_shape"])
        self.scheduler = make_scheduler(cfg.model.diffusion, options.scheduler)

    @classmethod
    def from_run(cls, run: str, options: SamplerConfig, device: torch.device) -> Sampler:
        trained = load_run(run, "ldm")
        return cls(trained.model, trained.cfg, require(trained.cfg.data.shards, LATENT_MEMBERS, trained.cfg.autoencoder),
                   options, device)

    @torch.no_grad()
    def sample(self, captions: list[str], seeds: list[int]) -> torch.Tensor:
        o, model = self.options, self.model
        cond = model.encode_text(self.tokenize(captions).to(self.device))
        if o.negative_caption:
            uncond = model.encode_text(self.tokenize([o.negative_caption] * len(captions)).to(self.device))
        else:  # all padding: what caption dropout trained as the unconditional input
            uncond = model.encode_text(torch.zeros(len(captions), cond.shape[1], dtype=torch.long, device=self.device))

        def predict(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if o.guidance_scale == 1:
                return model.predict(latents, t, cond)
            both = model.predict(torch.cat([latents, latents]), t, torch.cat([cond, uncond]))
            return guide(*both.chunk(2), o.guidance_scale)

        noise = initial_noise((len(captions), *self.latent_shape), seeded_generators(seeds), self.device)
        latents = denoise(predict, self.scheduler, noise, o.steps)
        return self.decoder.decode(latents / model.scale_factor).clamp(-1, 1)


def run(cfg: Config) -> int:
    require(cfg.data.shards, LATENT_MEMBERS, cfg.autoencoder)  # before any process group starts
    return exit_code(train(cfg, build_model))
