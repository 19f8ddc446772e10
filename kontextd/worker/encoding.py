"""Turning generated PIL images into the bytes and content types a client receives."""

import base64
import io

from PIL import Image

from kontextd.storage import keys

CONTENT_TYPES = {output_format: keys.CONTENT_TYPES[output_format] for output_format in ("jpeg", "png")}
EXTENSIONS = {content_type: extension for extension, content_type in keys.CONTENT_TYPES.items()}


def encode_image(image: Image.Image, output_format: str) -> bytes:
    buffer = io.BytesIO()
    if output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def preview_uri(image: Image.Image) -> str:
    """A live preview as the status stream sends it: a small JPEG, rough on purpose (quality 70)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=70)
    return data_uri(buffer.getvalue(), "image/jpeg")


def data_uri(data: bytes, content_type: str) -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode()}"
