"""The `score` stage: samples of shapes captions (a `sample` stage's folder) scored by the shapes
oracle (pipeline/data/shapes.py reads an image back into its colours and shapes), whichever family
drew them; and, given `autoencoder:` (any run whose model has `reconstruct`), that autoencoder's
reconstructions of held-out shapes images: their PSNR and how often the oracle reads the same
colours and shapes in a reconstruction as in its original. Writes `quality.json` and a
`report.html` fragment with the figures for the pipeline's report."""
from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch

from pipeline.data import shapes
from pipeline.data.build import encode
from pipeline.data.decode import decode_image
from pipeline.launch.config import LaunchConfig, launch_field
from pipeline.ranges import PositiveInt
from pipeline.runs import load_run

OUTPUT = "out_dir"


@dataclass
class Config:
    out_dir: str = ""
    samples: str = ""  # a sample stage's output folder: samples.jsonl and its images
    autoencoder: str = ""  # also score this autoencoder run's reconstructions of held-out shapes images
    reconstructions: PositiveInt = 256  # how many
    launch: LaunchConfig = launch_field()

    def validate(self) -> None:
        for key in ("out_dir", "samples"):
            if not getattr(self, key):
                raise ValueError(f"{key} is required")


def score(samples: Path) -> dict:
    """Colour accuracy and colour+shape accuracy, per the oracle, of the samples of single-shape
    captions in a sample folder (others are not scored)."""
    records = [json.loads(line) for line in (samples / "samples.jsonl").read_text().splitlines() if line.strip()]
    colour_hits = pair_hits = total = 0
    for record in records:
        wanted = shapes.caption_colours_and_shapes(record["caption"])
        if len(wanted) != 1:
            continue
        (colour, shape), found = next(iter(wanted)), shapes.read_shapes(PIL.Image.open(samples / record["file"]))
        total += 1
        colour_hits += colour in {c for c, _ in found}
        pair_hits += (colour, shape) in found
    return {"samples": total, "colour_accuracy": colour_hits / max(1, total),
            "colour_and_shape_accuracy": pair_hits / max(1, total)}


@torch.no_grad()
def score_reconstructions(run: str, count: int) -> dict:
    """PSNR (dB, of the posterior's mode) and the oracle's agreement between originals and
    reconstructions, over `count` held-out shapes images at the autoencoder's resolution, stored and
    decoded as the shards' images are (JPEG, quality 95)."""
    trained = load_run(run)
    resolution = trained.cfg.data.resolution
    originals = torch.stack([decode_image(encode(shapes.generate(i, shapes.HELDOUT_SEED, resolution).image), resolution)
                             for i in range(count)])
    rebuilt = torch.cat([trained.model.reconstruct(batch) for batch in originals.split(64)]).clamp(-1, 1)
    mse = (rebuilt - originals).pow(2).flatten(1).mean(1)
    agree = sum(shapes.read_shapes(a) == shapes.read_shapes(b) for a, b in zip(originals, rebuilt))
    return {"images": count, "psnr": (10 * torch.log10(4 / mse)).mean().item(), "oracle_agreement": agree / count}


def run(cfg: Config) -> int:
    out, samples = Path(cfg.out_dir), Path(cfg.samples)
    if not (samples / "samples.jsonl").exists():
        raise FileNotFoundError(f"samples={cfg.samples!r}: no samples.jsonl (a sample stage's folder is expected)")
    out.mkdir(parents=True, exist_ok=True)
    quality = score(samples)
    report = (f"<p>On {quality['samples']} samples of single-shape captions in {html.escape(str(samples))} the oracle "
              f"finds the caption's colour in <b>{quality['colour_accuracy']:.0%}</b> and its colour and shape together in "
              f"<b>{quality['colour_and_shape_accuracy']:.0%}</b> (chance: about 17% and 6%).</p>")
    print(f"oracle: colour {quality['colour_accuracy']:.1%}, colour and shape {quality['colour_and_shape_accuracy']:.1%} "
          f"on {quality['samples']} samples")
    if cfg.autoencoder:
        rebuilt = quality["reconstructions"] = score_reconstructions(cfg.autoencoder, cfg.reconstructions)
        report += (f"<p>The autoencoder {html.escape(cfg.autoencoder)} reconstructs {rebuilt['images']} held-out images "
                   f"at <b>{rebuilt['psnr']:.1f} dB</b> PSNR; the oracle reads the same colours and shapes in the "
                   f"reconstruction as in the original for <b>{rebuilt['oracle_agreement']:.0%}</b>.</p>")
        print(f"autoencoder: PSNR {rebuilt['psnr']:.2f} dB, oracle agreement {rebuilt['oracle_agreement']:.1%} "
              f"on {rebuilt['images']} held-out images")
    (out / "quality.json").write_text(json.dumps(quality, indent=1))
    (out / "report.html").write_text(report)
    return 0
