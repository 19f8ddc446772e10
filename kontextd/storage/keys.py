"""The grammar of storage keys: the only names a stored file can have.

Keys are made here and checked here. A key that arrives from outside (a `/files/…` path, one of our own URLs
given back as an `image_url`) is looked up only when it matches this grammar exactly, so no encoding trick
(`//abs`, `%2f`, `..`, backslashes, NUL, Unicode look-alikes) can name anything but a file we wrote: the
grammar has no room for a separator, a dot segment or an absolute path.
"""

import re

# Image file extensions a stored output may carry (upstreams may hand back webp).
EXTENSIONS = ("jpeg", "png", "webp")

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_OUTPUT_KEY = re.compile(rf"(?P<request_id>{_UUID})/(?P<index>0|[1-9][0-9]?)\.(?P<extension>jpeg|png|webp)")

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


def output_key(request_id: str, index: int, extension: str) -> str:
    """The key of a request's `index`th output image."""
    key = f"{request_id}/{index}.{extension}"
    if not is_valid(key):  # request ids are uuid4s we made; anything else is a bug, never stored
        raise ValueError(f"not a storage key: request {request_id!r}, image {index}, extension {extension!r}")
    return key


def is_valid(key: str) -> bool:
    """True only for keys this server generates: `<request uuid>/<index>.<extension>`."""
    return _OUTPUT_KEY.fullmatch(key) is not None


def content_type(key: str) -> str:
    """The media type a valid key is served with, from its extension."""
    return CONTENT_TYPES[key.rsplit(".", 1)[1]]
