"""Image tensors as pictures: the PIL images and grids that runs, reports and samples save."""
from __future__ import annotations

from typing import Sequence

import PIL.Image
import torch


def to_pil(image: torch.Tensor) -> PIL.Image.Image:
    """A (3, H, W) tensor in [-1, 1] (clamped) as an 8-bit RGB image."""
    array = image.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return PIL.Image.fromarray(array)


def image_grid(images: Sequence[PIL.Image.Image], columns: int, padding: int = 1) -> PIL.Image.Image:
    """The images (all of the first one's size) in rows of `columns`, `padding` black pixels
    between and around them."""
    width, height = images[0].size
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    grid = PIL.Image.new("RGB", (columns * (width + padding) + padding, rows * (height + padding) + padding))
    for i, image in enumerate(images):
        row, column = divmod(i, columns)
        grid.paste(image.convert("RGB"), (padding + column * (width + padding), padding + row * (height + padding)))
    return grid
