"""The `sample` stage (and `t2i sample`): captions -> images with a trained generative stage.

What every family shares lives here: the captions, one seed per image, batching, the PNGs,
`samples.jsonl` (file, caption, seed per image), `grid.png` with the captions, and optional
re-ranking of candidates with a CLIP model from a local open_clip checkpoint. How images are drawn
is the family's: its stage module's `Sampler`, with the options of its `SamplerConfig`, which is
the section of this config named after the stage (`dalle.top_k=32`, `pixelcnn.top_run=...`;
pipeline/sampling.py has the contract). Scoring samples is the `score` stage's.
"""
from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import torch
from tqdm import tqdm

from pipeline.config import operational
from pipeline.data.shapes import heldout_captions
from pipeline.images import to_pil
from pipeline.launch.config import LaunchConfig, launch_field
from pipeline.ranges import NonNegativeInt, PositiveInt
from pipeline.registry import load_stage
from pipeline.runs import stage_of
from stages import dalle, ldm, pixelcnn

OUTPUT = "out_dir"
FAMILIES = ("dalle", "pixelcnn", "ldm")  # the stages with a sampler, each a section of the config


@dataclass
class Config:
    out_dir: str = ""
    run: str = ""  # a generative stage's run folder (its final weights) or one of its checkpoint folders
    stage: str = ""  # the stage that trained `run`; empty: the one its folder records
    captions: str = ""  # a text file (one caption a line), a caption, or "heldout:N" (N held-out shapes captions)
    images_per_caption: PositiveInt = 4
    seed: NonNegativeInt = 0  # image j of each caption is drawn with seed + j: a caption and a seed give one image, in any batch
    batch_size: PositiveInt = operational(16)  # each image has its own random stream: batching does not change it
    clip_checkpoint: str = ""  # re-rank with this local open_clip checkpoint
    clip_model: str = "ViT-B-32"
    candidates: PositiveInt = 4  # with CLIP: samples drawn per image kept
    device: str = operational("")  # where the models run: "" = the GPU when there is one, else the CPU; or "cpu", "cuda:1"
    dalle: dalle.SamplerConfig = field(default_factory=dalle.SamplerConfig)
    pixelcnn: pixelcnn.SamplerConfig = field(default_factory=pixelcnn.SamplerConfig)
    ldm: ldm.SamplerConfig = field(default_factory=ldm.SamplerConfig)
    launch: LaunchConfig = launch_field()

    def unused_keys(self) -> set[str]:
        """Keys that cannot change these samples (pipeline/config.py's result_view): the sections of
        the other families when `stage` is set, the CLIP options without a CLIP checkpoint."""
        unused = {family for family in FAMILIES if self.stage and family != self.stage}
        return unused | ({"clip_model", "candidates"} if not self.clip_checkpoint else set())

    def validate(self) -> None:
        for key in ("out_dir", "run", "captions"):
            if not getattr(self, key):
                raise ValueError(f"{key} is required")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device is {self.device!r}, but PyTorch finds no CUDA GPU here")


def read_captions(spec: str) -> list[str]:
    if spec.startswith("heldout:"):
        return heldout_captions(int(spec.split(":", 1)[1]))
    path = Path(spec)
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [spec]


def device_of(cfg: Config) -> torch.device:
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def make_sampler(cfg: Config):
    """The family sampler of `cfg.run`, with its section of the config as options."""
    stage = cfg.stage or stage_of(cfg.run)
    if not stage:
        raise ValueError(f"run={cfg.run!r} does not say which stage trained it: set stage")
    if stage not in FAMILIES:
        raise ValueError(f"stage {stage!r} has no sampler; the stages that sample: {', '.join(FAMILIES)}")
    return load_stage(stage).Sampler.from_run(cfg.run, getattr(cfg, stage), device_of(cfg))


def run(cfg: Config) -> int:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sampler = make_sampler(cfg)
    captions = read_captions(cfg.captions)
    ranker = _ClipRanker(cfg) if cfg.clip_checkpoint else None
    draws = cfg.candidates if ranker else 1
    jobs = [(caption, cfg.seed + index) for caption in captions for index in range(cfg.images_per_caption)]
    records, images = [], []
    for start in tqdm(range(0, len(jobs), cfg.batch_size), desc="sample", unit="batch"):
        chunk = jobs[start:start + cfg.batch_size]
        texts = [caption for caption, _ in chunk]
        # Candidate d of an image draws from seed + d * 2^32: its own stream, the same in any batch.
        candidates = [sampler.sample(texts, [seed + draw * 2 ** 32 for _, seed in chunk]) for draw in range(draws)]
        batch = ranker.best(candidates, texts) if ranker else candidates[0]  # (B, 3, R, R)
        for (caption, seed), image in zip(chunk, batch):
            name = f"{len(records):04d}.png"
            picture = to_pil(image)
            picture.save(out / name)
            images.append(picture)
            records.append({"file": name, "caption": caption, "seed": seed})
    (out / "samples.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    _caption_grid(images, [record["caption"] for record in records], cfg.images_per_caption).save(out / "grid.png")
    print(f"wrote {len(records)} samples for {len(captions)} caption(s) to {out}")
    return 0


def _caption_grid(images: list[PIL.Image.Image], captions: list[str], per_row: int, cell: int = 128) -> PIL.Image.Image:
    """One row per caption: the caption, then its images."""
    rows = [(captions[i], images[i:i + per_row]) for i in range(0, len(images), per_row)]
    label = 220
    grid = PIL.Image.new("RGB", (label + per_row * cell, len(rows) * cell), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for row, (caption, row_images) in enumerate(rows):
        draw.multiline_text((6, row * cell + 8), "\n".join(textwrap.wrap(caption, 32)), fill="black")
        for column, image in enumerate(row_images):
            grid.paste(image.resize((cell, cell), PIL.Image.NEAREST), (label + column * cell, row * cell))
    return grid


class _ClipRanker:
    """Keeps, per caption, the candidate image a CLIP model scores highest."""

    def __init__(self, cfg: Config) -> None:
        import open_clip

        self.model, _, self.preprocess = open_clip.create_model_and_transforms(cfg.clip_model,
                                                                               pretrained=cfg.clip_checkpoint)
        self.device = device_of(cfg)
        self.model.to(self.device).eval()
        self.tokenizer = open_clip.get_tokenizer(cfg.clip_model)

    @torch.no_grad()
    def best(self, candidates: list[torch.Tensor], captions: list[str]) -> torch.Tensor:
        text = self.model.encode_text(self.tokenizer(captions).to(self.device))
        text = text / text.norm(dim=-1, keepdim=True)
        scores = []
        for images in candidates:
            pixels = torch.stack([self.preprocess(to_pil(image)) for image in images]).to(self.device)
            features = self.model.encode_image(pixels)
            scores.append((features / features.norm(dim=-1, keepdim=True) * text).sum(-1))  # (B,)
        choice = torch.stack(scores).argmax(0)  # (B,)
        return torch.stack([candidates[int(k)][i] for i, k in enumerate(choice)])
