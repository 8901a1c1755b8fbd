"""The `ldm` stage: text-to-image latent diffusion (pipeline/models/ldm.py), trained on the latent
shards of the `latents` stage; shards made by another autoencoder than `autoencoder:` (the
manifest's weights hash) are refused. The text encoder is a CLIP text transformer of the config's
sizes over the shards' tokenizer, or a pretrained transformers `CLIPTextModel` from a local folder
(`model.text.pretrained: hf:/path`, fed the shards' open_clip ids, padding 0 as open_clip's models
were trained with), trained with the UNet or frozen. `model.latent_*` and `model.text_*` say what
the shards hold and are checked against their manifest, so that `t2i describe` sizes a config
without them.

Its `Sampler` (`t2i sample`, the `ldm` section): one noise seed per image, a diffusers scheduler
(ddim, dpm++, euler) for `steps` steps, classifier-free guidance against the empty caption or a
negative one, and the autoencoder's decoder. `export_diffusers` writes a trained run as a
diffusers `StableDiffusionPipeline` folder (`t2i export RUN --format diffusers OUT`).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline.data.precomputed import require
from pipeline.data.shapes import heldout_captions
from pipeline.data.text import make_tokenizer, save_clip_tokenizer, vocab_size
from pipeline.engine.config import TrainConfig
from pipeline.engine.loop import exit_code, train
from pipeline.models.diffusion_sampling import SchedulerName, denoise, initial_noise, make_scheduler
from pipeline.models.guidance import guide
from pipeline.models.ldm import LatentDiffusion, LDMConfig
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


def check_latents(cfg: Config, trained_run: Path | None = None) -> dict:
    """The latent shards' manifest (for a trained run, the copy it recorded), after checking it
    matches the autoencoder and the model's shape."""
    manifest = require(cfg.data.shards, LATENT_MEMBERS, cfg.autoencoder, trained_run)
    m, producer, (channels, size, width) = cfg.model, manifest["producer"], manifest["info"]["latent_shape"]
    if size != width:
        raise ValueError(f"the latent shards hold {size}x{width} latents: the UNet takes square ones")
    expected = {"model.latent_channels": (m.latent_channels, channels), "model.latent_size": (m.latent_size, size),
                "model.text_length": (m.text_length, producer["text_length"]),
                "model.text_vocab_size": (m.text_vocab_size, vocab_size(producer["tokenizer"]))}
    for key, (ours, theirs) in expected.items():
        if ours != theirs:
            raise ValueError(f"{key} is {ours} but the latent shards have {theirs}")
    if m.text.pretrained and not producer["tokenizer"].startswith("open_clip:"):
        raise ValueError(f"a pretrained text encoder reads CLIP's token ids: the latent shards' tokenizer "
                         f"{producer['tokenizer']!r} makes other ones (write them with open_clip:ViT-B-32)")
    return manifest


def text_encoder(cfg: Config) -> nn.Module:
    """The configured CLIP text encoder: of the config's sizes, or pretrained from a local folder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    m = cfg.model
    if not m.text.pretrained:
        return CLIPTextModel(CLIPTextConfig(vocab_size=m.text_vocab_size, hidden_size=m.text.width,
                                            intermediate_size=4 * m.text.width, num_hidden_layers=m.text.layers,
                                            num_attention_heads=m.text.heads, max_position_embeddings=m.text_length,
                                            pad_token_id=0))
    kind, _, folder = m.text.pretrained.partition(":")
    if kind != "hf" or not folder:
        raise ValueError(f"model.text.pretrained must look like 'hf:/local/folder', got {m.text.pretrained!r}")
    encoder = CLIPTextModel.from_pretrained(folder, local_files_only=True)
    if encoder.config.max_position_embeddings < m.text_length or encoder.config.vocab_size < m.text_vocab_size:
        raise ValueError(f"{folder} reads {encoder.config.max_position_embeddings} tokens of {encoder.config.vocab_size} "
                         f"ids: fewer than model.text_length {m.text_length} or model.text_vocab_size {m.text_vocab_size}")
    return encoder


def build_model(cfg: Config) -> nn.Module:
    return LatentDiffusion(cfg.model, text_encoder(cfg))


def build_for_data(cfg: Config, manifest: dict) -> nn.Module:
    """The model with the latent shards' scale factor and the empty caption's tokens in their tokenizer."""
    model = build_model(cfg)
    producer = manifest["producer"]
    model.set_data(manifest["info"]["scale_factor"], make_tokenizer(producer["tokenizer"], producer["text_length"])([""])[0])
    return model


def flops_per_sample(cfg: Config) -> int:
    """Training FLOPs of one image (forward and backward, counted by torch on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    m = cfg.model
    with torch.device("meta"):
        # .to: after a transformers from_pretrained, torch.linspace ignores the device context (the schedule's buffer)
        model = build_model(cfg).to("meta")
    meta = {"device": "meta"}
    batch = {"latent_mean": torch.zeros(1, m.latent_channels, m.latent_size, m.latent_size, **meta),
             "text_tokens": torch.zeros(1, m.text_length, dtype=torch.long, **meta),
             "valid": torch.ones(1, dtype=torch.bool, **meta)}
    batch["latent_logvar"] = batch["latent_mean"]
    with FlopCounterMode(display=False) as counter:
        model(batch)["loss"].backward()
    return counter.get_total_flops()


@dataclass
class SamplerConfig:
    """`t2i sample` options for a latent diffusion run (the `ldm` section of the sample stage's config)."""

    scheduler: SchedulerName = "dpm++"
    steps: PositiveInt = 25
    guidance_scale: NonNegativeFloat = 5.0  # classifier-free guidance; 1: none, 0: the caption ignored
    negative_caption: str = ""  # guide away from this caption instead of the empty one


class Sampler:
    """Captions -> images: latents denoised from per-image noise by a diffusers scheduler, guided,
    then decoded by `decoder` (the autoencoder that made the latent shards; pipeline/sampling.py has
    the contract). `tokenize` maps captions to the model's token ids (L = model.cfg.text_length)."""

    def __init__(self, model: LatentDiffusion, decoder: nn.Module, tokenize: Callable[[list[str]], torch.Tensor],
                 options: SamplerConfig, device: torch.device) -> None:
        m = model.cfg
        self.model, self.decoder, self.tokenize = model.to(device).eval(), decoder.to(device), tokenize
        self.options, self.device = options, device
        self.latent_shape = (m.latent_channels, m.latent_size, m.latent_size)
        self.scheduler = make_scheduler(m.diffusion, options.scheduler)
        if options.steps >= m.diffusion.steps:  # leading spacing with offset 1 would start past the last step
            raise ValueError(f"ldm.steps must be below the {m.diffusion.steps} steps the model was trained on")

    @classmethod
    def from_run(cls, run: str, options: SamplerConfig, device: torch.device) -> Sampler:
        trained = load_run(run, "ldm")
        manifest = check_latents(trained.cfg, trained.folder)
        return cls(trained.model, *_decoder_and_tokenizer(trained.cfg, manifest), options, device)

    @torch.no_grad()
    def sample(self, captions: list[str], seeds: list[int]) -> torch.Tensor:
        o, model = self.options, self.model
        cond = model.encode_text(self.tokenize(captions).to(self.device))
        negative = self.tokenize([o.negative_caption] * len(captions)).to(self.device) if o.negative_caption else \
            model.null_tokens.expand(len(captions), -1)  # what caption dropout trained as the unconditional input
        uncond = model.encode_text(negative)
        dtype = model.unet.dtype  # bf16 when drawn during a DeepSpeed bf16 run without an EMA; the solver stays fp32

        def predict(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if o.guidance_scale == 1:
                return model.predict(latents.to(dtype), t, cond).float()
            both = model.predict(torch.cat([latents, latents]).to(dtype), t, torch.cat([cond, uncond])).float()
            return guide(*both.chunk(2), o.guidance_scale)

        noise = initial_noise((len(captions), *self.latent_shape), seeded_generators(seeds), self.device)
        latents = denoise(predict, self.scheduler, noise, o.steps)
        return self.decoder.decode(latents / model.scale_factor).clamp(-1, 1)


def _decoder_and_tokenizer(cfg: Config, manifest: dict) -> tuple[nn.Module, Callable[[list[str]], torch.Tensor]]:
    """The autoencoder that made the latent shards, and their tokenizer."""
    producer = manifest["producer"]
    return load_run(cfg.autoencoder, "kl_autoencoder").model, make_tokenizer(producer["tokenizer"], producer["text_length"])


def draw_images(decoder_and_tokenizer: tuple, model: LatentDiffusion, batch: dict) -> dict[str, torch.Tensor]:
    """Samples for 8 held-out shapes captions (one per column, two rows), 20 DPM-Solver++ steps."""
    options = SamplerConfig(steps=min(20, model.cfg.diffusion.steps - 1))
    sampler = Sampler(model, *decoder_and_tokenizer, options, batch["latent_mean"].device)
    return {"samples": sampler.sample(heldout_captions(8) * 2, list(range(16)))}


def export(run: str, fmt: str, out: str) -> Path:
    """Writes trained run `run` (its final weights, the EMA's when it kept one) to folder `out` in
    format `fmt`: 'diffusers', a `StableDiffusionPipeline` that `from_pretrained(out,
    local_files_only=True)` loads offline and that draws the images `t2i sample` draws for the same
    caption, seed, scheduler, steps and guidance scale (of 1 or more: the pipeline does not guide below 1). It holds the UNet, the text encoder, a CLIP
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
    producer = check_latents(cfg, trained.folder)["producer"]
    with tempfile.TemporaryDirectory() as folder:
        save_clip_tokenizer(producer["tokenizer"], producer["text_length"], folder)
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    vae = load_run(cfg.autoencoder, "kl_autoencoder").model.autoencoder
    vae.register_to_config(scaling_factor=float(model.scale_factor))  # the pipeline divides latents by it
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=model.text_encoder, tokenizer=tokenizer, unet=model.unet,
                                       scheduler=make_scheduler(cfg.model.diffusion, "dpm++"), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(target, safe_serialization=True)
    print(f"wrote a diffusers StableDiffusionPipeline of {run} to {target}")
    return target


def run(cfg: Config) -> int:
    manifest = check_latents(cfg)  # before any process group starts
    # sharded weights cannot sample
    images = partial(draw_images, _decoder_and_tokenizer(cfg, manifest)) if cfg.engine.zero_stage < 3 else None
    return exit_code(train(cfg, partial(build_for_data, manifest=manifest), images))
