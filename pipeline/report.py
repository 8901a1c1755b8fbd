"""`runs/PIPELINE/report.html`: one plain HTML page showing what every stage of a pipeline made —
its final metrics, its loss curves (inline SVG) and its image grids (the PNGs in its folder)."""
from __future__ import annotations

import html
import io
import json
import tarfile
from pathlib import Path

import PIL.Image

from pipeline.images import image_grid
from pipeline.launch.dag import Job

_CURVES = ("loss", "recon", "kl")


def write_report(name: str, jobs: list[Job], path: Path) -> Path:
    sections = [_section(job, path.parent) for job in jobs]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>t2i: {html.escape(name)}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{image-rendering:pixelated;"
            "max-width:100%;border:1px solid #ccc}table{border-collapse:collapse}td,th{padding:2px 10px;"
            "border-bottom:1px solid #eee;text-align:left}figure{display:inline-block;margin:0 1em 1em 0}"
            "</style></head><body>"
            f"<h1>Pipeline <code>{html.escape(name)}</code></h1>{''.join(sections)}</body></html>")
    path.write_text(page)
    return path


def _section(job: Job, root: Path) -> str:
    out = job.out_dir
    parts = [f"<h2>{html.escape(job.name)} <small>({html.escape(job.stage)})</small></h2>",
             f"<p><a href='{_rel(out / 'config.yaml', root)}'>config.yaml</a> · "
             f"<a href='{_rel(out / 'log.txt', root)}'>log</a>"
             f"{'' if job.is_complete() else ' · <b>not complete</b>'}</p>"]
    metrics = out / "final" / "metrics.json"
    if metrics.exists():
        parts.append(_metrics_table(json.loads(metrics.read_text())))
    curves = out / "metrics.jsonl"
    if curves.exists():
        rows = [json.loads(line) for line in curves.read_text().splitlines() if line.strip()]
        parts += [_svg_curve(rows, key) for key in _CURVES if any(key in row for row in rows)]
    if (out / "sizes.json").exists():
        parts.append(_shards_preview(out, root))
    images = sorted(path for path in (out / "images").glob("*.png") if "-step-" not in path.name) \
        if (out / "images").exists() else []
    parts += [f"<figure><img src='{_rel(image, root)}' width='{min(512, PIL.Image.open(image).width * 2)}'>"
              f"<figcaption>{html.escape(image.stem)}</figcaption></figure>" for image in images]
    if (out / "grid.png").exists():  # a sample stage's images with their captions
        parts.append(f"<figure><img src='{_rel(out / 'grid.png', root)}'><figcaption>captions and samples</figcaption></figure>")
    extra = out / "report.html"  # a stage may write a fragment of its own (quality figures, captions)
    if extra.exists():
        parts.append(extra.read_text())
    return "".join(parts)


def _metrics_table(metrics: dict) -> str:
    rows = []
    for key, value in metrics.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, dict):
            value = json.dumps(value.get("skipped", value)) if "skipped" in value else json.dumps(value)
            key = f"{key} (skipped)" if key == "data" else key
        rows.append(f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(value))}</td></tr>")
    return f"<table>{''.join(rows)}</table>"


def _svg_curve(rows: list[dict], key: str, width: int = 480, height: int = 160) -> str:
    points = [(row["step"], row[key]) for row in rows if key in row]
    if len(points) < 2:
        return ""
    steps, values = zip(*points)
    lo, hi = min(values), max(values)
    span_x, span_y = max(steps) - min(steps) or 1, (hi - lo) or 1
    coords = " ".join(f"{40 + (s - min(steps)) / span_x * (width - 50):.1f},"
                      f"{10 + (hi - v) / span_y * (height - 30):.1f}" for s, v in points)
    return (f"<figure><svg width='{width}' height='{height}' style='border:1px solid #ccc'>"
            f"<polyline fill='none' stroke='#1f77b4' stroke-width='1.5' points='{coords}'/>"
            f"<text x='2' y='14' font-size='10'>{hi:.4g}</text><text x='2' y='{height - 18}' font-size='10'>{lo:.4g}</text>"
            f"<text x='40' y='{height - 4}' font-size='10'>step {min(steps)}</text>"
            f"<text x='{width - 60}' y='{height - 4}' font-size='10'>{max(steps)}</text></svg>"
            f"<figcaption>{html.escape(key)}</figcaption></figure>")


def _shards_preview(out: Path, root: Path, count: int = 16) -> str:
    """A grid of the first images of the first shard, with their captions."""
    sizes = json.loads((out / "sizes.json").read_text())
    images, captions = [], []
    with tarfile.open(out / sorted(sizes)[0]) as tar:
        for member in tar:
            data = tar.extractfile(member).read() if member.isfile() else b""
            if member.name.endswith((".jpg", ".png", ".webp")) and len(images) < count:
                image = PIL.Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64))
                images.append(image)
            elif member.name.endswith(".txt") and len(captions) < 8:
                captions.append(data.decode())
    summary = f"<p>{sum(sizes.values())} samples in {len(sizes)} shards</p>"
    if not images:  # token shards: nothing to look at
        return summary + f"<ol>{''.join(f'<li>{html.escape(caption)}</li>' for caption in captions)}</ol>"
    grid = out / "preview.png"
    image_grid(images, columns=8, padding=2).save(grid)
    listing = "".join(f"<li>{html.escape(caption)}</li>" for caption in captions)
    return (f"{summary}<figure><img src='{_rel(grid, root)}'>"
            f"<figcaption>first images</figcaption></figure><ol>{listing}</ol>")


def _rel(path: Path, root: Path) -> str:
    return html.escape(str(Path(path).resolve().relative_to(root.resolve())), quote=True)
