"""Image bytes to a fixed-size RGB tensor.

Promises: any image PIL opens (jpg, png, webp, gif; modes 1, L, LA, P, RGB, RGBA, CMYK, I, I;16, F)
becomes RGB, transparency composited on white, 16-bit and float images scaled to 8 bits; then the
shorter side is resized to `resolution` and a centre or random square crop taken. An image whose
decode or resize would cost too much (too many pixels, too elongated; read from its header) is
refused before its pixels are decoded.
"""
from __future__ import annotations

import io
import random

import numpy as np
import PIL.Image
import torch

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif")

# Bounds on the work of one image. Decoding holds a few bytes per pixel (8 in the 16-bit path), and
# resizing the shorter side to R makes R * R * aspect ratio pixels: a 2 KB PNG of 1 x 1,000,000
# pixels costs 6 GB at R = 32.
MAX_IMAGE_PIXELS = 64_000_000
MAX_ASPECT_RATIO = 20.0


class DecodeError(ValueError):
    """The bytes are not an image PIL can read, or one too costly to decode; `reason` says which:
    'decode_error', 'image_too_large', 'extreme_aspect_ratio' or 'out_of_memory'."""

    def __init__(self, message: str, reason: str = "decode_error") -> None:
        super().__init__(message)
        self.reason = reason


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Returns `image` as 8-bit RGB; alpha (including palette transparency) is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # PIL's own convert("RGB") clips 16-bit values at 255: scale by the type's range instead.
        array = np.asarray(image, dtype=np.float64)
        top = 1.0 if image.mode == "F" and array.max(initial=0) <= 1.0 else 65535.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(array, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, resolution: int, crop: str = "center", rng: random.Random | None = None,
                 max_pixels: int = MAX_IMAGE_PIXELS, max_aspect_ratio: float = MAX_ASPECT_RATIO) -> torch.Tensor:
    """Decodes `data` to a float tensor (3, resolution, resolution) in [-1, 1].

    Raises DecodeError for anything that is not a readable image, and, before decoding any pixel,
    for an image with more than `max_pixels` pixels to decode (after JPEG's reduced-scale decoding)
    or whose longer side exceeds `max_aspect_ratio` times its shorter one."""
    try:
        image = PIL.Image.open(io.BytesIO(data))
        # JPEG can decode at 1/2, 1/4 or 1/8 scale for free: never below the target size.
        image.draft("RGB", (resolution, resolution))
        width, height = image.size
        if width * height > max_pixels:
            raise DecodeError(f"{width} x {height} pixels > {max_pixels}", "image_too_large")
        if max(width, height) > max_aspect_ratio * min(width, height):
            raise DecodeError(f"{width} x {height} pixels: aspect ratio > {max_aspect_ratio:g}", "extreme_aspect_ratio")
        image.load()
        image = to_rgb(image)
    except DecodeError:
        raise
    except PIL.Image.DecompressionBombError as error:
        raise DecodeError(str(error), "image_too_large") from error
    except MemoryError as error:
        raise DecodeError(f"out of memory decoding {len(data)} bytes", "out_of_memory") from error
    except (OSError, ValueError, SyntaxError) as error:
        raise DecodeError(str(error)) from error
    image = resize_and_crop(image, resolution, crop, rng)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def resize_and_crop(image: PIL.Image.Image, resolution: int, crop: str = "center",
                    rng: random.Random | None = None) -> PIL.Image.Image:
    """Resizes the shorter side to `resolution`, then crops a square at the centre or at random."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, PIL.Image.BICUBIC, reducing_gap=3.0)
    spare_x, spare_y = size[0] - resolution, size[1] - resolution
    if crop == "random":
        rng = rng or random.Random()
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    elif crop == "center":
        left, top = spare_x // 2, spare_y // 2
    else:
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    if spare_x or spare_y:
        image = image.crop((left, top, left + resolution, top + resolution))
    return image
