"""The contract between `t2i sample` (stages/sample.py) and a generative family.

A generative stage module provides `SamplerConfig`, a typed dataclass of its sampling options (the
`sample` stage's config holds one section of it, named after the stage; stages/sample.py lists the
families, FAMILIES, and a new family adds its section there), and `Sampler`, built by
`Sampler.from_run(run, options, device)` from a trained run folder (or one of its checkpoints), with

    sampler.sample(captions, seeds) -> images (B, 3, R, R) in [-1, 1], on its device,

where image i is drawn from its own random stream, seeded with seeds[i]: a caption and its seed
give the same image in any batch. Everything families share (captions, per-image seeds, batching,
writing images, CLIP re-ranking) lives in the `sample` stage; scoring samples is the `score` stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from pipeline.ranges import NonNegativeFloat, PositiveFloat, PositiveInt


class Sampler(Protocol):
    def sample(self, captions: list[str], seeds: list[int]) -> torch.Tensor:
        ...


@dataclass
class AutoregressiveOptions:
    """Options of the samplers that draw codes one at a time (DALL-E's prior, the PixelCNN)."""

    temperature: PositiveFloat = 1.0
    top_k: PositiveInt | None = None  # draw among the k most likely codes only; null: no limit
    guidance_scale: NonNegativeFloat = 1.0  # classifier-free guidance; 1: none, 0: the caption ignored


def seeded_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU random stream per image: the same seed draws the same image on any device."""
    return [torch.Generator().manual_seed(seed) for seed in seeds]
