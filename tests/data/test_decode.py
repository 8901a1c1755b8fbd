import io

import numpy as np
import PIL.Image
import pytest

from pipeline.data.decode import DecodeError, decode_image, to_rgb


def _encoded(image: PIL.Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _image(mode: str) -> PIL.Image.Image:
    if mode in ("I;16", "I"):
        return PIL.Image.new(mode, (50, 30), 40000)
    return PIL.Image.new(mode, (50, 30))


@pytest.mark.parametrize("mode,fmt", [
    ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"), ("I", "TIFF"), ("1", "PNG"),
    ("CMYK", "JPEG"), ("L", "JPEG"), ("RGB", "WEBP"), ("RGBA", "WEBP"), ("P", "GIF"), ("L", "GIF"),
])
def test_every_mode_decodes_to_rgb_of_the_resolution(mode, fmt):
    tensor = decode_image(_encoded(_image(mode), fmt), resolution=24)
    assert tensor.shape == (3, 24, 24)
    assert tensor.min() >= -1 and tensor.max() <= 1


def test_sixteen_bit_grey_keeps_its_brightness():
    # 40000 / 65535 of full scale, not clipped to white as PIL's own convert would
    tensor = decode_image(_encoded(_image("I;16"), "PNG"), resolution=16)
    assert tensor.mean().item() == pytest.approx(40000 / 65535 * 2 - 1, abs=0.01)


def test_transparency_is_composited_on_white():
    clear = PIL.Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert np.asarray(to_rgb(clear)).min() == 255
    palette = PIL.Image.new("P", (8, 8), 0)
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(palette)).min() == 255


def test_crop_keeps_the_centre_or_a_random_square():
    wide = PIL.Image.new("RGB", (90, 30), (0, 0, 0))
    wide.paste((255, 255, 255), (30, 0, 60, 30))  # white centre third
    centre = decode_image(_encoded(wide, "PNG"), 30, "center")
    assert centre.mean().item() > 0.95
    import random
    crops = {float(decode_image(_encoded(wide, "PNG"), 30, "random", random.Random(seed)).mean()) for seed in range(8)}
    assert len(crops) > 1


@pytest.mark.parametrize("data", [b"", b"<html><body>not found</body></html>", b"\xff\xd8\xff\xe0truncated"])
def test_non_images_raise_decode_error(data):
    with pytest.raises(DecodeError):
        decode_image(data, 16)
