"""Image tensors as pictures: the PIL images and grids that runs, reports and samples save, and the
grids of reconstructions and samples that autoencoder stages draw during training."""
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


def reconstructions(model: torch.nn.Module, batch: dict, count: int = 16) -> dict[str, torch.Tensor]:
    """Grids for any autoencoder with `reconstruct(images)`: `count` originals above their reconstructions."""
    originals = batch["image"][:count]
    return {"reconstructions": torch.cat([originals, model.reconstruct(originals)])}


def reconstructions_and_samples(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Grids for a VAE that also samples its prior (`sample(count, generator)`): 8 originals above
    their reconstructions, and 32 samples."""
    samples = model.sample(32, torch.Generator(batch["image"].device).manual_seed(0))
    return {**reconstructions(model, batch, 8), "samples": samples}
