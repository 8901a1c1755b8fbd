"""Writes image-text shards in img2dataset's layout: `NNNNN.tar` holding `KEY.jpg|png|webp`,
`KEY.txt` (the caption) and `KEY.json` (metadata), plus `sizes.json` (samples per shard).

Sources: the built-in shapes generator, a folder of images with `.txt` caption sidecars, or a
CSV/parquet table of image paths and captions.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import PIL.Image
import webdataset
from tqdm import tqdm

from pipeline.data import shapes
from pipeline.data.decode import IMAGE_EXTENSIONS
from pipeline.data.tars import whole_second_mtime

_KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class Example:
    """One image and its caption, about to be written."""

    image: bytes
    extension: str
    caption: str
    metadata: dict


def encode(image: PIL.Image.Image, extension: str = "jpg") -> bytes:
    buffer = io.BytesIO()
    if extension == "jpg":
        image.convert("RGB").save(buffer, "JPEG", quality=95)
    else:
        image.save(buffer, {"png": "PNG", "webp": "WEBP"}[extension])
    return buffer.getvalue()


def shapes_examples(count: int, resolution: int, seed: int, image_format: str = "jpg",
                    max_shapes: int = 3) -> Iterator[Example]:
    """`count` samples of the synthetic shapes data set, deterministic in `seed`."""
    for index in range(count):
        sample = shapes.generate(index, seed, resolution, max_shapes=max_shapes)
        yield Example(encode(sample.image, image_format), image_format, sample.caption,
                      {"source": "shapes", "seed": seed, "index": index, **sample.metadata()})


def _read_image_file(path: Path) -> tuple[bytes, str]:
    """The file's bytes when it already is jpg/png/webp, else the image re-encoded as png."""
    data = path.read_bytes()
    with PIL.Image.open(io.BytesIO(data)) as image:
        image.load()
        kept = _KEPT_FORMATS.get(image.format or "")
        if kept:
            return data, kept
        return encode(image, "png"), "png"


def folder_examples(folder: str | os.PathLike, skipped: dict[str, int]) -> Iterator[Example]:
    """Images under `folder` (recursively, sorted) whose `.txt` sidecar holds the caption."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    for path in sorted(root.rglob("*")):
        if path.suffix.lower().lstrip(".") not in IMAGE_EXTENSIONS + ("bmp", "tif", "tiff"):
            continue
        caption_path = path.with_suffix(".txt")
        if not caption_path.exists():
            skipped["missing_caption"] = skipped.get("missing_caption", 0) + 1
            continue
        example = _example_from_file(path, caption_path.read_text(encoding="utf-8").strip(), skipped)
        if example:
            yield example


def table_examples(table: str | os.PathLike, image_column: str, caption_column: str,
                   skipped: dict[str, int]) -> Iterator[Example]:
    """Rows of a CSV or parquet file; relative image paths are taken from the table's folder."""
    import pandas

    table = Path(table)
    frame = pandas.read_parquet(table) if table.suffix == ".parquet" else pandas.read_csv(table)
    for column in (image_column, caption_column):
        if column not in frame.columns:
            raise ValueError(f"{table}: no column {column!r} (columns: {', '.join(map(str, frame.columns))})")
    for image_path, caption in zip(frame[image_column], frame[caption_column]):
        path = Path(str(image_path))
        example = _example_from_file(path if path.is_absolute() else table.parent / path,
                                     "" if caption is None else str(caption).strip(), skipped)
        if example:
            yield example


def _example_from_file(path: Path, caption: str, skipped: dict[str, int]) -> Example | None:
    try:
        data, extension = _read_image_file(path)
    except (OSError, ValueError, SyntaxError) as error:
        reason = "missing_image" if isinstance(error, FileNotFoundError) else "decode_error"
        skipped[reason] = skipped.get(reason, 0) + 1
        return None
    return Example(data, extension, caption, {"source": str(path)})


def write_shards(examples: Iterator[Example], out_dir: str | os.PathLike, samples_per_shard: int = 1000,
                 total: int | None = None) -> dict[str, int]:
    """Writes the examples to `out_dir/00000.tar`, ... with keys `000000000`, ... and `sizes.json`;
    returns samples per shard path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    written = 0
    with webdataset.ShardWriter(str(out / "%05d.tar"), maxcount=samples_per_shard, verbose=0,
                                 mtime=whole_second_mtime()) as writer:
        for example in tqdm(examples, total=total, desc=f"writing {out}", unit="img"):
            key = f"{written:09d}"
            writer.write({"__key__": key, example.extension: example.image, "txt": example.caption,
                          "json": json.dumps({"key": key, "caption": example.caption, **example.metadata})})
            name = f"{written // samples_per_shard:05d}.tar"
            sizes[name] = sizes.get(name, 0) + 1
            written += 1
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1))
    return {str(out / name): count for name, count in sizes.items()}
