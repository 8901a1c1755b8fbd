"""The `latents` stage: image-text shards -> latent shards, with a trained `kl_autoencoder`, through
the precompute machinery (pipeline/precompute.py), so that the latent diffusion stage never runs
the autoencoder's encoder while it trains.

Per sample: `KEY.txt` (the caption), `KEY.text.npy` (member `text_tokens`, uint16), and the
posterior q(z|x) as `KEY.mean.npy` and `KEY.logvar.npy` (members `latent_mean` and
`latent_logvar`, float16, (C, H/f, W/f)): training draws z = mean + exp(logvar / 2) eps afresh
each time it sees an image. The manifest's `info` gives the latent shape, the downsampling factor
and the scale factor 1 / std(z) over all the data (Rombach et al. 2022, section 4.3.2; Stable
Diffusion's 0.18215 was measured so), the variance of z being that of the means plus the mean
posterior variance exp(logvar) (estimated as exp of the mean log-variance: by Jensen a lower bound,
and with the KL weight of 1e-6 a small share of the total).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.data.precomputed import Member
from pipeline.data.text import portable, vocab_size
from pipeline.precompute import PrecomputeConfig, run_precompute
from pipeline.ranges import PositiveInt
from pipeline.runs import load_run

OUTPUT = "out_dir"
STAGE = "kl_autoencoder"


@dataclass
class Config(PrecomputeConfig):
    autoencoder: str = ""  # the output folder of a trained kl_autoencoder stage
    text_length: PositiveInt = 77  # CLIP's context: what the latent diffusion stage's text encoder reads

    def validate(self) -> None:
        super().validate()
        if not self.autoencoder:
            raise ValueError("autoencoder is required")


class LatentEncoder:
    """The KL autoencoder's posterior over latents of the images, and the captions' tokens."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        trained = load_run(cfg.autoencoder, STAGE)
        self.model = trained.model.to(device)
        self.device, self.resolution = device, trained.cfg.data.resolution
        self.tokenizer, self.text_length = cfg.tokenizer, cfg.text_length
        model_cfg = trained.cfg.model
        shape = (model_cfg.latent_channels, *(2 * [model_cfg.image_size // model_cfg.downsampling]))
        self.members = {"text_tokens": Member("uint16", (cfg.text_length,), "text.npy", vocab_size(cfg.tokenizer) - 1),
                        "latent_mean": Member("float16", shape, "mean.npy"),
                        "latent_logvar": Member("float16", shape, "logvar.npy")}
        self.producer = {"weights_sha256": trained.weights_sha256, "stage": STAGE,
                         "tokenizer": portable(cfg.tokenizer), "text_length": cfg.text_length}
        self.info = {"latent_shape": list(shape), "downsampling": model_cfg.downsampling,
                     "autoencoder": str(trained.folder.resolve())}

    @torch.no_grad()
    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        posterior = self.model.encode(batch["image"].to(self.device))
        return {"text_tokens": batch["text_tokens"], "latent_mean": posterior.mean, "latent_logvar": posterior.logvar}

    def derived_info(self, statistics: dict[str, dict[str, float]]) -> dict:
        """The scale factor that gives the latents unit variance (see the module docstring)."""
        variance = statistics["latent_mean"]["std"] ** 2 + math.exp(statistics["latent_logvar"]["mean"])
        return {"scale_factor": 1 / math.sqrt(variance)}


def run(cfg: Config) -> int:
    return run_precompute(cfg, lambda device: LatentEncoder(cfg, device))
