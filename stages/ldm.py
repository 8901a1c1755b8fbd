"""The `ldm` stage: text-to-image latent diffusion (pipeline/models/ldm.py), trained on the latent
shards of the `latents` stage; shards made by another autoencoder than `autoencoder:` (the
manifest's weights hash) are refused. The text encoder is a CLIP text transformer of the config's
sizes over the shards' tokenizer, or a pretrained transformers `CLIPTextModel` from a local folder
(`model.text.pretrained: hf:/path`), trained with the UNet or frozen.

Its `Sampler` (`t2i sample`, the `ldm` section): one noise seed per image, a diffusers scheduler
(ddim, dpm++, euler) for `steps` steps, classifier-free guidance against the empty caption or a
negative one, and the autoencoder's decoder. `export_diffusers` writes a trained run as a
diffusers `StableDiffusionPipeline` folder (`t2i export RUN --format diffusers OUT`).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline.data.precomputed import require
from pipeline.data.text import make_tokenizer, save_clip_tokenizer, vocab_size
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
    info, producer = manifest["info"], manifest["producer"]
    null_tokens = make_tokenizer(producer["tokenizer"], producer["text_length"])([""])[0]
    return LatentDiffusion(cfg.model, text_encoder(cfg, producer), tuple(info["latent_shape"]), info["scale_factor"],
                           null_tokens)


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
        negative = self.tokenize([o.negative_caption] * len(captions)).to(self.device) if o.negative_caption else \
            model.null_tokens.expand(len(captions), -1)  # what caption dropout trained as the unconditional input
        uncond = model.encode_text(negative)

        def predict(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if o.guidance_scale == 1:
                return model.predict(latents, t, cond)
            both = model.predict(torch.cat([latents, latents]), t, torch.cat([cond, uncond]))
            return guide(*both.chunk(2), o.guidance_scale)

        noise = initial_noise((len(captions), *self.latent_shape), seeded_generators(seeds), self.device)
        latents = denoise(predict, self.scheduler, noise, o.steps)
        return self.decoder.decode(latents / model.scale_factor).clamp(-1, 1)


def export(run: str, fmt: str, out: str) -> Path:
    """Writes trained run `run` (its final weights, the EMA's when it kept one) to folder `out` in
    format `fmt`: 'diffusers', a `StableDiffusionPipeline` that `from_pretrained(out,
    local_files_only=True)` loads offline and that draws the images `t2i sample` draws for the same
    caption, seed, scheduler, steps and guidance scale. It holds the UNet, the text encoder, a CLIP
    tokenizer giving the shards' ids (their tokenizer must be open_clip's BPE), the autoencoder with
    the run's scale factor, and the DPM-Solver++ scheduler (any of ours fits: make_scheduler)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    if fmt != "diffusers":
        raise ValueError(f"unknown export format {fmt!r}: the ldm stage exports 'diffusers'")
    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise ValueError(f"{target} is not empty: export to a new folder")
    trained = load_run(run, "ldm")
    cfg, model = trained.cfg, trained.model
    producer = require(cfg.data.shards, LATENT_MEMBERS, cfg.autoencoder)["producer"]
    text = model.text_encoder
    if isinstance(text, PretrainedTextEncoder):
        if text.id_offset:
            raise ValueError(f"{run}'s captions were tokenized by {producer['tokenizer']!r}, whose ids t2i shifts: "
                             "export needs latent shards tokenized with open_clip:ViT-B-32")
        text = text.encoder
    with tempfile.TemporaryDirectory() as folder:
        save_clip_tokenizer(producer["tokenizer"], producer["text_length"], folder)
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    vae = load_run(cfg.autoencoder, "kl_autoencoder").model.autoencoder
    vae.register_to_config(scaling_factor=float(model.scale_factor))  # the pipeline divides latents by it
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=model.unet,
                                       scheduler=make_scheduler(cfg.model.diffusion, "dpm++"), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(target, safe_serialization=True)
    print(f"wrote a diffusers StableDiffusionPipeline of {run} to {target}")
    return target


def run(cfg: Config) -> int:
    require(cfg.data.shards, LATENT_MEMBERS, cfg.autoencoder)  # before any process group starts
    return exit_code(train(cfg, build_model))
