"""The `sample` stage (and `t2i sample`): captions -> images with a trained prior over codes.

`prior: dalle`: DALL-E's transformer, KV-cached (temperature, top-k, top-p, classifier-free
guidance, seed), decoded by its dVAE. `prior: pixelcnn`: a PixelCNN over a VQ-VAE's codes; for
VQ-VAE-2, `run` is the bottom prior and `top_run` the top one, sampled first (hierarchical).
Writes `OUT/NNNN.png`, `OUT/samples.jsonl` (file, caption, seed per image) and `OUT/grid.png` with
the captions. Optionally re-ranks candidates with a CLIP model from a
local open_clip checkpoint, and scores shapes captions with the shapes oracle (`quality.json`).
"""
from __future__ import annotations

import html
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import PIL.Image
import PIL.ImageDraw
import torch
from tqdm import tqdm

from pipeline.config import operational
from pipeline.data import shapes
from pipeline.data.shapes import heldout_captions
from pipeline.data.text import make_tokenizer
from pipeline.images import to_pil
from pipeline.launch.config import LaunchConfig, launch_field
from pipeline.runs import load_run
from stages import dalle, pixelcnn
from stages.pretokenize import split_codes

OUTPUT = "out_dir"
PRIORS = ("dalle", "pixelcnn")


@dataclass
class Config:
    out_dir: str = ""
    run: str = ""  # a prior's run folder (its final weights) or one of its checkpoint folders
    prior: str = "dalle"  # the stage that trained it: dalle or pixelcnn
    top_run: str = ""  # pixelcnn at level bottom: the top-level pixelcnn run, sampled first
    captions: str = ""  # a text file (one caption a line), a caption, or "heldout:N" (N held-out shapes captions)
    images_per_caption: int = 4
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    guidance_scale: float = 1.0
    seed: int = 0  # image j of each caption is drawn with seed + j: a caption and a seed give one image, in any batch
    batch_size: int = operational(16)  # each image has its own random stream: batching does not change it
    clip_checkpoint: str = ""  # re-rank with this local open_clip checkpoint
    clip_model: str = "ViT-B-32"
    candidates: int = 4  # with CLIP: samples drawn per image kept
    score: bool = False  # score shapes captions with the oracle: colour and colour+shape accuracy
    device: str = operational("")  # where the models run: "" = the GPU when there is one, else the CPU; or "cpu", "cuda:1"
    launch: LaunchConfig = launch_field()

    def validate(self) -> None:
        for key in ("out_dir", "run", "captions"):
            if not getattr(self, key):
                raise ValueError(f"{key} is required")
        if self.images_per_caption < 1 or self.batch_size < 1 or self.candidates < 1:
            raise ValueError("images_per_caption, batch_size and candidates must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or null: no limit), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (or null: no limit), got {self.top_p}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device is {self.device!r}, but PyTorch finds no CUDA GPU here")
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {', '.join(PRIORS)}, got {self.prior!r}")
        if self.prior == "pixelcnn" and self.top_p is not None:
            raise ValueError("top_p: the pixelcnn sampler supports temperature, top_k and guidance_scale")


def read_captions(spec: str) -> list[str]:
    if spec.startswith("heldout:"):
        return heldout_captions(int(spec.split(":", 1)[1]), 64)
    path = Path(spec)
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [spec]


def load_prior(run: str | Path, stage: str) -> tuple[torch.nn.Module, object]:
    """The model and config of a `stage` run folder (final weights) or of one of its checkpoint folders."""
    trained = load_run(run, stage)
    return trained.model, trained.cfg


Sampler = Callable[[torch.Tensor, list[torch.Generator]], torch.Tensor]  # caption tokens, one generator each -> images


def device_of(cfg: Config) -> torch.device:
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def make_sampler(cfg: Config) -> tuple[Sampler, dict]:
    """A function from caption tokens (B, L) to images (B, 3, R, R) in [-1, 1], both on
    device_of(cfg), where the models are, and the manifest of the token shards the prior was
    trained on (its tokenizer, its autoencoder). The random streams stay on the CPU: the same seed
    gives the same tokens on any device."""
    device = device_of(cfg)
    prior, prior_cfg = load_prior(cfg.run, cfg.prior)
    prior.to(device)
    if cfg.prior == "dalle":
        manifest = dalle.check_tokens(prior_cfg)
        dvae = load_run(prior_cfg.dvae, manifest["autoencoder_stage"]).model
        dvae.to(device)
        grid = prior_cfg.model.image_grid

        def sample_dalle(text: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
            tokens = prior.generate(text, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                    guidance_scale=cfg.guidance_scale, generator=generators)
            return dvae.decode(tokens.view(-1, grid, grid))
        return sample_dalle, manifest
    manifest = pixelcnn.check_tokens(prior_cfg)
    autoencoder = load_run(prior_cfg.autoencoder, manifest["autoencoder_stage"]).model
    autoencoder.to(device)
    options = {"temperature": cfg.temperature, "top_k": cfg.top_k, "guidance_scale": cfg.guidance_scale}
    if prior_cfg.level == "single":
        return (lambda text, generators: autoencoder.decode(split_codes(
            prior.prior.generate(text, generator=generators, **options), manifest["code_grids"])[0])), manifest
    if prior_cfg.level != "bottom" or not cfg.top_run:
        raise ValueError(f"{cfg.run}: a VQ-VAE-2 {prior_cfg.level} prior: sample with the bottom prior as run "
                         "and the top prior as top_run")
    top, top_cfg = load_prior(cfg.top_run, "pixelcnn")
    top.to(device)
    if top_cfg.level != "top" or pixelcnn.check_tokens(top_cfg)["autoencoder_sha256"] != manifest["autoencoder_sha256"]:
        raise ValueError(f"top_run={cfg.top_run!r} is not a top-level prior over the same VQ-VAE-2's codes as {cfg.run!r}")

    def sample_hierarchy(text: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        top_codes = top.prior.generate(text, generator=generators, **options)  # (B, top grid ** 2)
        bottom_codes = prior.prior.generate(text, condition=top_codes, generator=generators, **options)
        return autoencoder.decode(*split_codes(torch.cat([top_codes, bottom_codes], 1), manifest["code_grids"]))
    return sample_hierarchy, manifest


def run(cfg: Config) -> int:
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sampler, manifest = make_sampler(cfg)
    device = device_of(cfg)
    captions = read_captions(cfg.captions)
    tokenize = make_tokenizer(manifest["tokenizer"], manifest["text_length"])
    ranker = _ClipRanker(cfg) if cfg.clip_checkpoint else None
    draws = cfg.candidates if ranker else 1
    jobs = [(caption, cfg.seed + index) for caption in captions for index in range(cfg.images_per_caption)]
    records, images = [], []
    for start in tqdm(range(0, len(jobs), cfg.batch_size), desc="sample", unit="batch"):
        chunk = jobs[start:start + cfg.batch_size]
        text = tokenize([caption for caption, _ in chunk]).to(device)
        candidates = [sampler(text, [_generator(seed, draw) for _, seed in chunk])
                      for draw in range(draws)]  # each (B, 3, R, R)
        batch = ranker.best(candidates, [c for c, _ in chunk]) if ranker else candidates[0]
        for (caption, seed), image in zip(chunk, batch):
            name = f"{len(records):04d}.png"
            picture = to_pil(image)
            picture.save(out / name)
            images.append(picture)
            records.append({"file": name, "caption": caption, "seed": seed})
    (out / "samples.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    _caption_grid(images, [record["caption"] for record in records], cfg.images_per_caption).save(out / "grid.png")
    if cfg.score:
        _score(out, images, records)
    print(f"wrote {len(records)} samples for {len(captions)} caption(s) to {out}")
    return 0


def _generator(seed: int, draw: int) -> torch.Generator:
    """The random stream of one image: its caption and seed (and, re-ranking, which candidate)
    give the same image in any batch."""
    return torch.Generator().manual_seed(seed + draw * 2 ** 32)


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


def _score(out: Path, images: list[PIL.Image.Image], records: list[dict]) -> None:
    """Colour accuracy and colour+shape accuracy of samples of single-shape captions, per the oracle."""
    colour_hits = pair_hits = total = 0
    for image, record in zip(images, records):
        wanted = shapes.caption_colours_and_shapes(record["caption"])
        if len(wanted) != 1:
            continue
        (colour, shape), found = next(iter(wanted)), shapes.read_shapes(image)
        total += 1
        colour_hits += colour in {c for c, _ in found}
        pair_hits += (colour, shape) in found
    quality = {"samples": total, "colour_accuracy": colour_hits / max(1, total),
               "colour_and_shape_accuracy": pair_hits / max(1, total)}
    (out / "quality.json").write_text(json.dumps(quality, indent=1))
    (out / "report.html").write_text(
        f"<p>On {total} samples of held-out single-shape captions the oracle finds the caption's colour in "
        f"<b>{quality['colour_accuracy']:.0%}</b> and its colour and shape together in "
        f"<b>{quality['colour_and_shape_accuracy']:.0%}</b> (chance: about 17% and 6%).</p>"
        f"<figure><img src='{html.escape(out.name)}/grid.png'><figcaption>captions and samples</figcaption></figure>")
    print(f"oracle: colour {quality['colour_accuracy']:.1%}, colour and shape {quality['colour_and_shape_accuracy']:.1%}")


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
