"""Raw tar samples of image shards (img2dataset's layout: KEY.jpg|png|webp, KEY.txt) to training
samples, and samples to batches. Precomputed shards have their own reader (precomputed.py)."""
from __future__ import annotations

import random

import torch

from pipeline.data.decode import IMAGE_EXTENSIONS, MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, DecodeError, decode_image
from pipeline.data.tars import RawSample, Skip


def caption_of(item: RawSample) -> str | Skip:
    """The sample's caption (KEY.txt), or why it has none."""
    if "txt" not in item.files:
        return Skip("missing_caption", item.shard, item.key)
    try:
        return item.files["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        return Skip("bad_caption", item.shard, item.key)


def image_sample(item: RawSample, resolution: int, crop: str, rng: random.Random,
                 max_pixels: int = MAX_IMAGE_PIXELS, max_aspect_ratio: float = MAX_ASPECT_RATIO) -> dict | Skip:
    """{image (3, R, R) in [-1, 1], caption, key, valid}, or why the sample is unusable; the image is
    refused as decode_image says when it would cost more than `max_pixels` and `max_aspect_ratio` allow."""
    extension = next((ext for ext in IMAGE_EXTENSIONS if ext in item.files), None)
    if extension is None:
        return Skip("missing_image", item.shard, item.key)
    caption = caption_of(item)
    if isinstance(caption, Skip):
        return caption
    if not item.files[extension]:
        return Skip("empty_file", item.shard, item.key)
    try:
        image = decode_image(item.files[extension], resolution, crop, rng, max_pixels, max_aspect_ratio)
    except DecodeError as error:
        return Skip(error.reason, item.shard, item.key, str(error))
    return {"image": image, "caption": caption, "key": item.key, "valid": True}


def collate(samples: list[dict]) -> dict:
    """Tensors stacked along a new batch dimension, everything else in lists."""
    batch = {}
    for name in samples[0]:
        values = [sample[name] for sample in samples]
        if torch.is_tensor(values[0]):
            batch[name] = torch.stack(values)
        elif isinstance(values[0], bool):
            batch[name] = torch.tensor(values)
        else:
            batch[name] = values
    return batch
