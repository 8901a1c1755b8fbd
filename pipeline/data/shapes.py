"""Built-in synthetic "shapes" dataset: a generator and the oracle that reads it back.

`generate(index, seed, resolution)` draws 1..max_shapes non-overlapping circles, squares
and up-pointing triangles, each in a distinct saturated named colour, on a grey background
(plain or low-saturation texture), and writes a caption that states every shape's size,
colour and kind. The output depends only on the arguments, never on process or platform.

`read_shapes(image)` is the oracle: it segments an image by colour and returns the
(colour, shape) pairs it shows, robust to JPEG (quality 95) artifacts and to speckle, so
generated samples can be scored against their captions with `caption_colours_and_shapes`.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "orange": (250, 135, 0),
    "yellow": (240, 215, 0),
    "green": (10, 180, 50),
    "blue": (25, 60, 225),
    "purple": (145, 30, 210),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, tuple[float, float]] = {"small": (0.28, 0.34), "large": (0.42, 0.50)}
BACKGROUNDS: tuple[str, ...] = ("plain", "noise", "stripes", "checks")

Box = tuple[int, int, int]  # (x0, y0, side) in pixels of a shape's square bounding box
_LAYOUT_TRIES = 10
_PLACEMENT_TRIES = 20
# Oracle thresholds: background chroma (max - min channel) stays under ~20, colours' is >= 170.
_CHROMA_FRACTION = 0.5
_MIN_COMPONENT_FRACTION = 0.015  # the smallest shape (small triangle at 32 px) covers ~3.3%


@dataclass(frozen=True)
class Shape:
    shape: str  # one of SHAPES
    colour: str  # key of COLOURS
    size: str  # "small" or "large"
    cx: float  # centre, fraction of the image side (0..1)
    cy: float


@dataclass(frozen=True)
class ShapesSample:
    image: Image.Image  # RGB, resolution x resolution
    caption: str
    shapes: tuple[Shape, ...]
    background: str = "plain"  # one of BACKGROUNDS

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable description of what was drawn."""
        return {"shapes": [asdict(s) for s in self.shapes], "background": self.background}


def generate(
    index: int, seed: int, resolution: int, max_shapes: int = 3, textured_fraction: float = 0.5
) -> ShapesSample:
    """Deterministic in all arguments: same inputs, same pixels and caption.

    Picks 1..max_shapes shapes and retries the layout until they all fit without touching;
    if they never do, the fullest layout found is drawn, and the caption and metadata
    describe only what was actually drawn.
    """
    if not 32 <= resolution <= 256:
        raise ValueError(f"resolution must be in 32..256, got {resolution}")
    if not 1 <= max_shapes <= len(COLOURS):
        raise ValueError(f"max_shapes must be in 1..{len(COLOURS)}, got {max_shapes}")
    rng = random.Random(f"{seed}-{index}")  # str seeds hash via sha512: stable everywhere
    background = "plain" if rng.random() >= textured_fraction else rng.choice(BACKGROUNDS[1:])
    image = Image.fromarray(_background(background, resolution, rng))
    count = rng.randint(1, max_shapes)
    layout: list[tuple[Shape, Box]] = []
    for _ in range(_LAYOUT_TRIES):
        candidate = _layout(count, resolution, rng)
        if len(candidate) > len(layout):
            layout = candidate
        if len(layout) == count:
            break
    draw = ImageDraw.Draw(image)
    for shape, box in layout:
        _draw(draw, shape.shape, box, COLOURS[shape.colour])
    shapes = [shape for shape, _ in layout]
    return ShapesSample(image, _caption(shapes), tuple(shapes), background)


def _layout(count: int, resolution: int, rng: random.Random) -> list[tuple[Shape, Box]]:
    """Up to count shapes in distinct colours with their boxes; those with no room are left out."""
    placed: list[tuple[Shape, Box]] = []
    for colour in rng.sample(sorted(COLOURS), count):
        kind, size = rng.choice(SHAPES), rng.choice(sorted(SIZES))
        side = round(rng.uniform(*SIZES[size]) * resolution)
        box = _place(side, resolution, [box for _, box in placed], rng)
        if box is not None:
            x0, y0, _ = box
            cx, cy = (x0 + side / 2) / resolution, (y0 + side / 2) / resolution
            placed.append((Shape(kind, colour, size, round(cx, 4), round(cy, 4)), box))
    return placed


def _background(kind: str, resolution: int, rng: random.Random) -> np.ndarray:
    """A light or mid grey HxWx3 uint8 background, faintly tinted, never saturated."""
    grey = rng.randint(120, 225)
    tint = np.array([rng.randint(-6, 6) for _ in range(3)])
    ys, xs = np.mgrid[:resolution, :resolution]
    period = rng.randint(4, 12) * resolution // 64 + 2
    if kind == "noise":  # from rng's own bytes: numpy's generators may change between versions
        noise = np.frombuffer(rng.randbytes(resolution**2), np.uint8).astype(np.int64) % 37 - 18
        level = grey + noise.reshape(resolution, resolution)
    elif kind == "stripes":
        along = rng.choice([xs, ys, xs + ys, xs - ys])
        level = grey + np.where((along // period) % 2 == 0, -15, 15)
    elif kind == "checks":
        level = grey + np.where((xs // period + ys // period) % 2 == 0, -15, 15)
    else:
        level = np.full((resolution, resolution), grey)
    return np.clip(level[..., None] + tint, 0, 255).astype(np.uint8)


def _place(side: int, resolution: int, boxes: list[Box], rng: random.Random) -> Box | None:
    """A box fully inside the image, clear of every placed box by a gap; None if none found."""
    gap = max(2, resolution // 32)  # keeps JPEG colour bleed between shapes apart
    for _ in range(_PLACEMENT_TRIES):
        x0, y0 = rng.randint(1, resolution - 1 - side), rng.randint(1, resolution - 1 - side)
        # boxes are apart when any one of their four one-sided separations reaches the gap
        if all(max(bx - x0 - side, x0 - bx - bs, by - y0 - side, y0 - by - bs) >= gap
               for bx, by, bs in boxes):
            return x0, y0, side
    return None


def _draw(draw: ImageDraw.ImageDraw, kind: str, box: Box, fill: tuple[int, int, int]) -> None:
    x0, y0, side = box
    x1, y1 = x0 + side - 1, y0 + side - 1  # PIL boxes are inclusive
    if kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # isosceles, pointing up, base at the bottom
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _caption(shapes: list[Shape]) -> str:
    phrases = [f"a {s.size} {s.colour} {s.shape}" for s in shapes]
    if len(shapes) == 2:
        return f"{phrases[0]} {_relation(*shapes)} {phrases[1]}"
    if len(shapes) > 2:
        return ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return phrases[0]


def _relation(a: Shape, b: Shape) -> str:
    """Where a lies relative to b, along the axis on which their centres differ most."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"  # image y grows downwards
    return "to the left of" if dx < 0 else "to the right of"


_PHRASE = re.compile(rf"\b({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")


HELDOUT_SEED = 1000  # the seed of configs/shards/shapes-heldout.yaml: captions never trained on


def heldout_captions(count: int, resolution: int = 64) -> list[str]:
    """Single-shape captions from the held-out seed, distinct, in a fixed order."""
    captions: list[str] = []
    index = 0
    while len(captions) < count:
        caption = generate(index, HELDOUT_SEED, resolution, max_shapes=1).caption
        if caption not in captions:
            captions.append(caption)
        index += 1
    return captions


def caption_colours_and_shapes(caption: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs stated by a caption that `generate` wrote."""
    return {(colour, shape) for _, colour, shape in _PHRASE.findall(caption)}


def read_shapes(image: Any) -> set[tuple[str, str]]:
    """The oracle: the (colour, shape) pairs an RGB image shows.

    Accepts a PIL image, an HxWx3 uint8 array, or a 3xHxW float array/tensor in [-1, 1].
    Each colour's largest connected region counts if it covers at least 1.5% of the image.
    """
    rgb = _to_uint8_hwc(image).astype(np.float32)
    height, width, _ = rgb.shape
    labels = _colour_labels(rgb)
    found = set()
    for i, colour in enumerate(COLOURS):
        runs = _largest_component(labels == i)
        if sum(end - start for _, start, end in runs) >= _MIN_COMPONENT_FRACTION * height * width:
            found.add((colour, _classify(runs)))
    return found


def _to_uint8_hwc(image: Any) -> np.ndarray:
    """HxWx3 uint8 from a PIL image or an HWC/CHW array or tensor (floats taken as [-1, 1])."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if hasattr(image, "detach"):  # torch tensor, without importing torch
        image = image.detach().cpu().float().numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    if np.issubdtype(array.dtype, np.floating):
        array = np.round((np.clip(array, -1.0, 1.0) + 1.0) * 127.5)
    return array.astype(np.uint8)


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue angle in degrees [0, 360) of float RGB values, close to HSV hue (any leading shape)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.degrees(np.arctan2(np.sqrt(3.0) * (g - b), 2.0 * r - g - b)) % 360.0


_COLOUR_HUES = _hue(np.array(list(COLOURS.values()), dtype=np.float32))
_COLOUR_CHROMAS = np.array([max(rgb) - min(rgb) for rgb in COLOURS.values()], dtype=np.float32)


def _colour_labels(rgb: np.ndarray) -> np.ndarray:
    """Per pixel, the index of the nearest named colour by hue, or -1 for background.

    A pixel counts when its chroma is at least half that of its colour: blur (JPEG chroma
    subsampling) mixes shape and background linearly, so the half-way level is the true edge.
    """
    chroma = rgb.max(axis=-1) - rgb.min(axis=-1)
    distance = np.abs(_hue(rgb)[..., None] - _COLOUR_HUES)
    nearest = np.minimum(distance, 360.0 - distance).argmin(axis=-1)
    return np.where(chroma >= _CHROMA_FRACTION * _COLOUR_CHROMAS[nearest], nearest, -1)


def _largest_component(mask: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs (row, start, end) of mask's largest 4-connected region (run-length union-find)."""
    padded = np.pad(mask, ((0, 0), (1, 1))).astype(np.int8)
    rows, cols = np.nonzero(np.diff(padded, axis=1))  # starts and ends alternate in each row
    runs = [(int(r), int(s), int(e)) for r, s, e in zip(rows[::2], cols[::2], cols[1::2])]
    parent = list(range(len(runs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    previous: list[int] = []  # indices of the runs in the row above
    current: list[int] = []
    for i, (row, start, end) in enumerate(runs):
        if current and runs[current[0]][0] != row:
            previous, current = (current if runs[current[0]][0] == row - 1 else []), []
        for j in previous:
            if runs[j][1] < end and start < runs[j][2]:
                parent[root(i)] = root(j)
        current.append(i)
    sizes: dict[int, int] = {}
    for i, (_, start, end) in enumerate(runs):
        sizes[root(i)] = sizes.get(root(i), 0) + end - start
    biggest = max(sizes, key=sizes.get, default=-1)
    return [run for i, run in enumerate(runs) if root(i) == biggest]


def _classify(runs: list[tuple[int, int, int]]) -> str:
    """Circle, square or up-pointing triangle from the region's pixel moments about its centroid.

    Moments average over all pixels, so JPEG's edge pixels barely move them (at 9-12 px they
    swing a bounding-box fill ratio across the circle/square line). A triangle's rows are skewed
    (ideally -0.57, others 0); a square's diagonal corners make the fourfold harmonic
    r^4 cos(4 theta) negative (ideally -0.6 of its scale, a circle's 0).
    """
    ys = np.concatenate([np.full(end - start, row) for row, start, end in runs]).astype(float)
    xs = np.concatenate([np.arange(start, end) for _, start, end in runs]).astype(float)
    x, y = xs - xs.mean(), ys - ys.mean()
    if (y**3).mean() / max((y**2).mean(), 1e-9) ** 1.5 < -0.18:
        return "triangle"
    fourfold = (x**4 - 6 * x**2 * y**2 + y**4).mean() / max((x**2 + y**2).mean(), 1e-9) ** 2
    return "square" if fourfold < -0.18 else "circle"
