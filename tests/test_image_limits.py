"""The documented input limit, 14142 pixels a side, is the limit actually applied when decoding."""

import io
import struct
import zlib

import pytest
from PIL import Image

from kontextd.fetch.guard import FetchError
from kontextd.fetch.images import decode_image


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` with no pixels behind it: a decoder that trusted the
    header and allocated first would need width x height x 3 bytes."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def test_an_image_near_the_documented_limit_decodes() -> None:
    # 14000 x 14000 is 196 megapixels: refused before by Pillow's own bomb check (179 megapixels).
    buffer = io.BytesIO()
    Image.new("1", (14000, 14000)).save(buffer, format="PNG")
    image = decode_image(buffer.getvalue())
    assert (image.size, image.mode) == ((14000, 14000), "RGB")


# Pillow warns past its pixel ceiling before our check refuses the image: expected here.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(("width", "height"), [(14143, 1), (1, 14143), (14143, 14143), (100_000, 100_000)])
def test_a_side_over_the_limit_is_refused_naming_the_limit(width: int, height: int) -> None:
    with pytest.raises(FetchError) as refused:
        decode_image(png_header_only(width, height))
    assert refused.value.error_type == "image_too_large"
    assert refused.value.message in (
        f"Image dimensions {width}x{height} exceed the maximum 14142x14142",
        "Image has too many pixels; the maximum is 14142x14142",  # Pillow's own check, past 2 x the limit
    )
    assert refused.value.ctx == {"max_height": 14142, "max_width": 14142}
