import io
import json
import random
import time
from collections import Counter

import numpy as np
import PIL.Image
import pytest

from pipeline.data import shapes
from pipeline.data.shapes import COLOURS, SHAPES, caption_colours_and_shapes, generate, read_shapes


def jpeg_round_trip(image: PIL.Image.Image, quality: int = 95) -> PIL.Image.Image:
    """The image as a shard stores it."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return PIL.Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def drawn_pairs(sample: shapes.ShapesSample) -> set[tuple[str, str]]:
    return {(s["colour"], s["shape"]) for s in sample.metadata()["shapes"]}


def test_same_inputs_give_same_pixels_and_caption():
    first, second = generate(7, seed=3, resolution=64), generate(7, seed=3, resolution=64)
    assert first.image.tobytes() == second.image.tobytes()
    assert first.caption == second.caption
    assert first.metadata() == second.metadata()


def test_different_seeds_or_indices_differ():
    images = {generate(index, seed, 64).image.tobytes() for index in range(3) for seed in range(3)}
    assert len(images) == 9


@pytest.mark.parametrize("resolution", [32, 48, 64, 128, 256])
def test_image_has_the_requested_size(resolution):
    sample = generate(0, 0, resolution)
    assert sample.image.mode == "RGB"
    assert sample.image.size == (resolution, resolution)


@pytest.mark.parametrize("resolution", [31, 257])
def test_resolution_out_of_range_raises(resolution):
    with pytest.raises(ValueError):
        generate(0, 0, resolution)


def test_captions_state_what_was_drawn_and_everything_occurs():
    samples = [generate(index, 11, 64) for index in range(200)]
    for sample in samples:
        metadata = json.loads(json.dumps(sample.metadata()))
        assert caption_colours_and_shapes(sample.caption) == drawn_pairs(sample), sample.caption
        assert len(drawn_pairs(sample)) == len(sample.shapes)  # colours are distinct
        words = sample.caption.split()
        assert words.count("small") + words.count("large") == len(sample.shapes)
        assert all(0.0 < s["cx"] < 1.0 and 0.0 < s["cy"] < 1.0 for s in metadata["shapes"])
    assert {len(s.shapes) for s in samples} == {1, 2, 3}
    assert {shape.colour for s in samples for shape in s.shapes} == set(COLOURS)
    assert {shape.shape for s in samples for shape in s.shapes} == set(SHAPES)
    backgrounds = {s.metadata()["background"] for s in samples}
    assert "plain" in backgrounds and backgrounds - {"plain"}


def test_two_shape_caption_relation_follows_the_centres():
    for index in range(100):
        sample = generate(index, 5, 64)
        if len(sample.shapes) != 2:
            continue
        a, b = sample.shapes
        dx, dy = a.cx - b.cx, a.cy - b.cy
        if abs(dy) >= abs(dx):
            expected = "above" if dy < 0 else "below"
        else:
            expected = "to the left of" if dx < 0 else "to the right of"
        assert f" {a.shape} {expected} a " in sample.caption, sample.caption


def test_caption_parser_inverts_each_caption_form():
    assert caption_colours_and_shapes("a small red circle") == {("red", "circle")}
    assert caption_colours_and_shapes("a small red circle above a large blue square") == {
        ("red", "circle"), ("blue", "square")}
    assert caption_colours_and_shapes(
        "a small red circle, a large blue square and a small green triangle"
    ) == {("red", "circle"), ("blue", "square"), ("green", "triangle")}
    assert caption_colours_and_shapes("a photo of a cat") == set()


def test_oracle_reads_back_jpeg_images():
    exact = Counter()
    per_colour, per_shape = Counter(), Counter()
    seen_colour, seen_shape = Counter(), Counter()
    for resolution in (32, 64, 128):
        for index in range(150):
            sample = generate(index, 2024, resolution)
            read = read_shapes(jpeg_round_trip(sample.image))
            exact[read == drawn_pairs(sample)] += 1
            for pair in drawn_pairs(sample):
                seen_colour[pair[0]] += 1
                seen_shape[pair[1]] += 1
                per_colour[pair[0]] += pair in read
                per_shape[pair[1]] += pair in read
    images = sum(exact.values())
    accuracy = exact[True] / images
    print(f"oracle exact-set accuracy after JPEG q95: {accuracy:.4f} over {images} images")
    assert accuracy >= 0.99
    for colour, count in seen_colour.items():
        assert per_colour[colour] / count >= 0.99, colour
    for shape, count in seen_shape.items():
        assert per_shape[shape] / count >= 0.99, shape


@pytest.mark.parametrize("kind", shapes.BACKGROUNDS)
@pytest.mark.parametrize("resolution", [32, 128])
def test_oracle_sees_nothing_on_a_background_alone(kind, resolution):
    for seed in range(5):
        background = shapes._background(kind, resolution, random.Random(seed))
        assert read_shapes(jpeg_round_trip(PIL.Image.fromarray(background))) == set()
    assert read_shapes(PIL.Image.new("RGB", (resolution, resolution), (128, 128, 128))) == set()


def test_oracle_ignores_speckles_and_noise():
    rng = np.random.default_rng(0)
    for index in range(20):
        sample = generate(index, 9, 64)
        pixels = np.asarray(sample.image).astype(np.float64) + rng.normal(0.0, 6.0, (64, 64, 3))
        for colour in COLOURS.values():  # isolated single pixels of every colour
            ys, xs = rng.integers(0, 64, 10), rng.integers(0, 64, 10)
            pixels[ys, xs] = colour
        noisy = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
        assert read_shapes(noisy) == drawn_pairs(sample), sample.caption


def test_oracle_accepts_chw_float_in_minus_one_to_one():
    for index in range(10):
        sample = generate(index, 1, 64)
        chw = np.asarray(sample.image).transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
        assert read_shapes(chw) == drawn_pairs(sample)
        assert read_shapes(np.asarray(sample.image)) == drawn_pairs(sample)


def test_oracle_accepts_a_torch_tensor():
    torch = pytest.importorskip("torch")
    sample = generate(3, 1, 64)
    chw = torch.from_numpy(np.asarray(sample.image).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    assert read_shapes(chw) == drawn_pairs(sample)


def test_oracle_is_fast_at_256():
    images = [jpeg_round_trip(generate(index, 4, 256).image) for index in range(10)]
    start = time.perf_counter()
    for image in images:
        read_shapes(image)
    seconds = (time.perf_counter() - start) / len(images)
    print(f"oracle: {seconds * 1000:.1f} ms per 256x256 image")
    assert seconds < 0.2
