"""Several reference images on one canvas for the local pipeline (kontextd.backends.references)."""

import itertools

import pytest
from PIL import Image

from kontextd.backends.references import canvas_layout, reference_image

MEGAPIXEL = 1024 * 1024


def test_two_squares_sit_side_by_side_at_the_output_area() -> None:
    size, boxes = canvas_layout([(64, 64), (500, 500)], MEGAPIXEL, 16)
    assert size == (1440, 720)  # 2:1, about a megapixel, sides multiples of 16
    assert boxes == [(0, 0, 720, 720), (720, 0, 1440, 720)]  # each scaled to the same height


@pytest.mark.parametrize(
    "sizes",
    [
        [(320, 180), (90, 160)],
        [(90, 160), (320, 180), (64, 64), (1000, 10)],
        [(1, 14142), (14142, 1)],  # absurd shapes still tile exactly
    ],
)
def test_boxes_tile_the_canvas_in_order_without_gaps(sizes: list[tuple[int, int]]) -> None:
    (width, height), boxes = canvas_layout(sizes, MEGAPIXEL, 16)
    assert width % 16 == 0 and height % 16 == 0
    assert boxes[0][0] == 0 and boxes[-1][2] == width
    for (*_, right, _), (left, *_) in itertools.pairwise(boxes):
        assert right == left  # the next starts where this one ends
    for left, top, right, bottom in boxes:
        assert (top, bottom) == (0, height) and right > left  # full height, at least a pixel wide


def test_widths_follow_each_images_shape() -> None:
    (_, height), boxes = canvas_layout([(320, 180), (90, 160)], MEGAPIXEL, 16)
    widths = [right - left for left, _, right, _ in boxes]
    assert widths[0] / height == pytest.approx(320 / 180, abs=0.01)
    assert widths[1] / height == pytest.approx(90 / 160, abs=0.01)


def test_one_reference_is_resized_to_the_output_itself() -> None:
    image = Image.new("RGB", (320, 180), (1, 2, 3))
    assert reference_image([image], (176, 96), 16).size == (176, 96)


def test_references_keep_their_order_and_colours_on_the_canvas() -> None:
    red, blue = Image.new("RGB", (50, 50), (255, 0, 0)), Image.new("RGB", (50, 50), (0, 0, 255))
    canvas = reference_image([red, blue], (128, 128), 16)
    width, height = canvas.size
    assert (width, height) == (192, 96)  # 2:1 at about 128x128 pixels: the height rounded to 16s first
    assert canvas.getpixel((5, height // 2)) == (255, 0, 0)
    assert canvas.getpixel((width - 5, height // 2)) == (0, 0, 255)


def test_no_reference_is_an_error() -> None:
    with pytest.raises(ValueError):
        canvas_layout([], MEGAPIXEL, 16)
