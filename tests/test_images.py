import PIL.Image
import torch

from pipeline.images import image_grid, to_pil


def test_to_pil_maps_minus_one_to_black_and_one_to_white_and_clamps():
    image = torch.tensor([-1.0, 0.0, 1.0, 5.0]).view(1, 2, 2).expand(3, 2, 2)
    picture = to_pil(image)
    assert [picture.getpixel((x, y)) for y in (0, 1) for x in (0, 1)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255), (255, 255, 255)]


def test_grid_places_images_in_rows_with_black_padding():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    grid = image_grid([PIL.Image.new("RGB", (4, 3), colour) for colour in colours], columns=2, padding=1)
    assert grid.size == (2 * 5 + 1, 2 * 4 + 1)
    assert grid.getpixel((0, 0)) == (0, 0, 0)
    assert grid.getpixel((1, 1)) == colours[0] and grid.getpixel((4, 3)) == colours[0]
    assert grid.getpixel((6, 1)) == colours[1]
    assert grid.getpixel((1, 5)) == colours[2]
    assert grid.getpixel((6, 5)) == (0, 0, 0)  # the empty cell
