"""Turning an untrusted image reference (data: URI or http(s) URL) into a decoded RGB image."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import urllib.parse

from PIL import Image, ImageOps

from kontextd.fetch.guard import FetchError, GuardedFetcher

MAX_IMAGE_SIDE = 14142  # fal's documented limit: 14142 x 14142, about 200 megapixels

_TOO_LARGE_CTX = {"max_height": MAX_IMAGE_SIDE, "max_width": MAX_IMAGE_SIDE}

# Pillow's decompression-bomb guard is process-wide and stricter than the limit we document (it refuses
# above 2 x 89 megapixels, so 14000 x 14000 failed although the docs promise 14142 x 14142). Our per-side
# check below is the limit; make Pillow's agree with it instead of second-guessing it.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE

# Web image formats only: Pillow can open many exotic formats (EPS even hands data to Ghostscript), and
# callers have no business sending those.
Image.init()
_FORMATS = tuple(f for f in ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF", "AVIF") if f in Image.ID)


def _too_large(message: str) -> FetchError:
    return FetchError("image_too_large", message, dict(_TOO_LARGE_CTX))


def decode_image(data: bytes) -> Image.Image:
    """Decode ``data`` into a loaded, upright RGB image, refusing oversized images before decoding pixels.

    Should Pillow's decompression-bomb check fire anyway (another part of the process changed it), its
    error or warning is reported as too large as well, with the same limit.
    """
    try:
        with Image.open(io.BytesIO(data), formats=_FORMATS) as image:
            width, height = image.size  # from the header; no pixels decoded yet
            if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
                raise _too_large(
                    f"Image dimensions {width}x{height} exceed the maximum {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}"
                )
            image.load()
            upright = ImageOps.exif_transpose(image)
            return upright.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large(
            f"Image has too many pixels; the maximum is {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}"
        ) from None
    except FetchError:
        raise
    except Exception as exc:
        # Decoders for untrusted bytes fail in many ways (OSError, SyntaxError, ValueError, struct.error ...);
        # all of them mean the same thing to the caller.
        raise FetchError(
            "image_load_error", "Could not load the image: not a valid or supported image"
        ) from exc


def parse_data_uri(uri: str) -> bytes:
    """Decode a ``data:[<mediatype>][;base64],<data>`` URI."""
    scheme, sep, rest = uri.partition(":")
    header, comma, payload = rest.partition(",")
    if scheme.strip().lower() != "data" or not sep or not comma:
        raise FetchError("image_load_error", "Malformed data URI")
    if header.lower().endswith(";base64"):
        # Tolerate line breaks and missing padding, which encoders in the wild produce.
        compact = "".join(urllib.parse.unquote(payload).split())
        try:
            data = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise FetchError("image_load_error", "Malformed data URI: invalid base64 data") from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if not data:
        raise FetchError("image_load_error", "Malformed data URI: no data")
    return data


async def load_image(url: str, fetcher: GuardedFetcher) -> Image.Image:
    """Load an image from a data: URI or, through the guard, an http(s) URL."""
    if url[:5].lower() == "data:":
        data = parse_data_uri(url)
    else:
        data = await fetcher.get(url)
    # Decoding is CPU-bound; keep it off the event loop.
    return await asyncio.to_thread(decode_image, data)
