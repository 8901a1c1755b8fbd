"""The `score` stage: samples of shapes captions (a `sample` stage's folder) scored by the shapes
oracle (pipeline/data/shapes.py reads an image back into its colours and shapes), whichever family
drew them. Writes `quality.json` (samples scored, colour accuracy, colour+shape accuracy) and a
`report.html` fragment with the figures for the pipeline's report."""
from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import PIL.Image

from pipeline.data import shapes
from pipeline.launch.config import LaunchConfig, launch_field

OUTPUT = "out_dir"


@dataclass
class Config:
    out_dir: str = ""
    samples: str = ""  # a sample stage's output folder: samples.jsonl and its images
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


def run(cfg: Config) -> int:
    out, samples = Path(cfg.out_dir), Path(cfg.samples)
    if not (samples / "samples.jsonl").exists():
        raise FileNotFoundError(f"samples={cfg.samples!r}: no samples.jsonl (a sample stage's folder is expected)")
    out.mkdir(parents=True, exist_ok=True)
    quality = score(samples)
    (out / "quality.json").write_text(json.dumps(quality, indent=1))
    (out / "report.html").write_text(
        f"<p>On {quality['samples']} samples of single-shape captions in {html.escape(str(samples))} the oracle finds "
        f"the caption's colour in <b>{quality['colour_accuracy']:.0%}</b> and its colour and shape together in "
        f"<b>{quality['colour_and_shape_accuracy']:.0%}</b> (chance: about 17% and 6%).</p>")
    print(f"oracle: colour {quality['colour_accuracy']:.1%}, colour and shape {quality['colour_and_shape_accuracy']:.1%} "
          f"on {quality['samples']} samples")
    return 0
