"""The `shards` stage: writes image-text shards from the shapes generator, a folder or a table."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pipeline.data.build import folder_examples, shapes_examples, table_examples, write_shards
from pipeline.data.shapes import COLOURS
from pipeline.launch.config import LaunchConfig, launch_field
from pipeline.ranges import NonNegativeInt, PositiveInt, Range


@dataclass
class ShardsConfig:
    """What to write and where. `source` picks the generator; the other keys say how."""

    out_dir: str = ""
    source: Literal["shapes", "folder", "table"] = "shapes"
    count: PositiveInt = 2000  # shapes: samples to generate
    resolution: PositiveInt = 64  # shapes: image side in pixels, 32..256
    seed: NonNegativeInt = 0  # shapes: the same seed gives the same data set
    max_shapes: Annotated[int, Range(1, len(COLOURS))] = 3  # shapes: each of its own colour
    image_format: Literal["jpg", "png", "webp"] = "jpg"
    folder: str = ""  # folder: images with .txt caption sidecars
    table: str = ""  # table: a .csv or .parquet file
    image_column: str = "image"
    caption_column: str = "caption"
    samples_per_shard: PositiveInt = 1000
    launch: LaunchConfig = launch_field()

    def validate(self) -> None:
        if not self.out_dir:
            raise ValueError("out_dir is required")
        if self.source == "shapes" and not 32 <= self.resolution <= 256:
            raise ValueError(f"resolution must be between 32 and 256 for shapes, got {self.resolution}")
        if self.source == "folder" and not self.folder:
            raise ValueError("source 'folder' needs folder")
        if self.source == "table" and not self.table:
            raise ValueError("source 'table' needs table")


Config = ShardsConfig
OUTPUT = "out_dir"


def run(cfg: ShardsConfig) -> None:
    result = build(cfg)
    skipped = ", ".join(f"{reason} {count}" for reason, count in result["skipped"].items()) or "none"
    print(f"wrote {result['written']} samples in {len(result['shards'])} shard(s) to {cfg.out_dir}; skipped: {skipped}")


def build(cfg: ShardsConfig) -> dict:
    """Writes the shards; returns {written, shards, skipped (reason -> count)}."""
    skipped: dict[str, int] = {}
    if cfg.source == "shapes":
        examples = shapes_examples(cfg.count, cfg.resolution, cfg.seed, cfg.image_format, cfg.max_shapes)
        total = cfg.count
    elif cfg.source == "folder":
        examples, total = folder_examples(cfg.folder, skipped), None
    else:
        examples, total = table_examples(cfg.table, cfg.image_column, cfg.caption_column, skipped), None
    shards = write_shards(examples, cfg.out_dir, cfg.samples_per_shard, total)
    return {"written": sum(shards.values()), "shards": list(shards), "skipped": skipped}
