"""Raw tar samples to training samples, and samples to batches.

Two kinds of shard: `images` (img2dataset's layout: KEY.jpg|png|webp, KEY.txt) and `tokens`
(written by pretokenize: KEY.txt, KEY.text.npy and KEY.image.npy, uint16 token ids).
"""
from __future__ import annotations

import io
import random

import numpy as np
import torch

from pipeline.data.decode import IMAGE_EXTENSIONS, DecodeError, decode_image
from pipeline.data.tars import RawSample, Skip

TEXT_TOKENS, IMAGE_TOKENS = "text.npy", "image.npy"


def _caption(item: RawSample) -> str | Skip:
    if "txt" not in item.files:
        return Skip("missing_caption", item.shard, item.key)
    try:
        return item.files["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        return Skip("bad_caption", item.shard, item.key)


def image_sample(item: RawSample, resolution: int, crop: str, rng: random.Random) -> dict | Skip:
    """{image (3, R, R) in [-1, 1], caption, key, valid}, or why the sample is unusable."""
    extension = next((ext for ext in IMAGE_EXTENSIONS if ext in item.files), None)
    if extension is None:
        return Skip("missing_image", item.shard, item.key)
    caption = _caption(item)
    if isinstance(caption, Skip):
        return caption
    if not item.files[extension]:
        return Skip("empty_file", item.shard, item.key)
    try:
        image = decode_image(item.files[extension], resolution, crop, rng)
    except DecodeError as error:
        return Skip("decode_error", item.shard, item.key, str(error))
    return {"image": image, "caption": caption, "key": item.key, "valid": True}


def token_sample(item: RawSample) -> dict | Skip:
    """{text_tokens, image_tokens (long), caption, key, valid}, or why the sample is unusable."""
    if IMAGE_TOKENS not in item.files or TEXT_TOKENS not in item.files:
        return Skip("missing_tokens", item.shard, item.key)
    caption = _caption(item)
    if isinstance(caption, Skip):
        return caption
    try:
        text, image = (np.load(io.BytesIO(item.files[name]), allow_pickle=False) for name in (TEXT_TOKENS, IMAGE_TOKENS))
    except (ValueError, OSError) as error:
        return Skip("decode_error", item.shard, item.key, str(error))
    return {"text_tokens": torch.from_numpy(text.astype(np.int64)), "image_tokens": torch.from_numpy(image.astype(np.int64)),
            "caption": caption, "key": item.key, "valid": True}


TOKEN_ID_LIMIT = 2 ** 16  # token shards store ids as uint16


def token_members(caption: str, text_tokens: torch.Tensor, image_tokens: torch.Tensor) -> dict[str, bytes]:
    """The tar members of one token sample (without its key); every id must be < TOKEN_ID_LIMIT."""
    members = {"txt": caption.encode("utf-8")}
    for name, tokens in ((TEXT_TOKENS, text_tokens), (IMAGE_TOKENS, image_tokens)):
        buffer = io.BytesIO()
        np.save(buffer, tokens.cpu().numpy().astype(np.uint16), allow_pickle=False)
        members[name] = buffer.getvalue()
    return members


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
