"""The grammar of storage keys: the only names a stored file can have.

Two forms, both made here and checked here: a request's outputs, `<request uuid>/<index>.<extension>`,
and files clients upload as inputs (fal's storage API, kontextd.api.uploads), `uploads/<uuid4>.<extension>`:
a name we draw at random, never one the client chose (its file name never reaches a path).

A key that arrives from outside (a `/files/…` path, one of our own URLs given back as an `image_url`) is
looked up only when it matches this grammar exactly, so no encoding trick (`//abs`, `%2f`, `..`,
backslashes, NUL, Unicode look-alikes) can name anything but a file we wrote: the grammar has no room for
a separator, a dot segment or an absolute path.
"""

import re
import uuid

# Image file extensions a stored output may carry (upstreams may hand back webp).
EXTENSIONS = ("jpeg", "png", "webp")
# What an upload may be: the web's image formats the Kontext pipelines decode (kontextd.fetch.images).
UPLOAD_EXTENSIONS = ("jpeg", "png", "webp", "gif")

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_OUTPUT_KEY = re.compile(rf"(?P<request_id>{_UUID})/(?P<index>0|[1-9][0-9]?)\.(?P<extension>jpeg|png|webp)")
UPLOADS = "uploads"  # the folder (or object prefix) of uploads: no request id is ever this word
_UPLOAD_KEY = re.compile(rf"{UPLOADS}/{_UUID}\.(jpeg|png|webp|gif)")

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif"}


def output_key(request_id: str, index: int, extension: str) -> str:
    """The key of a request's `index`th output image."""
    key = f"{request_id}/{index}.{extension}"
    # Request ids are uuid4s we made; anything else is a bug, never stored.
    if _OUTPUT_KEY.fullmatch(key) is None:
        raise ValueError(f"not a storage key: request {request_id!r}, image {index}, extension {extension!r}")
    return key


def upload_key(extension: str) -> str:
    """A new key for an uploaded file: random, so it says nothing about who uploaded it or when."""
    key = f"{UPLOADS}/{uuid.uuid4()}.{extension}"
    if not is_upload(key):
        raise ValueError(f"not an upload extension: {extension!r}")
    return key


def is_valid(key: str) -> bool:
    """True only for keys this server generates: `<request uuid>/<index>.<extension>` (an output) or
    `uploads/<uuid>.<extension>` (an upload)."""
    return _OUTPUT_KEY.fullmatch(key) is not None or _UPLOAD_KEY.fullmatch(key) is not None


def is_upload(key: str) -> bool:
    """True only for keys of uploaded files (upload_key's)."""
    return _UPLOAD_KEY.fullmatch(key) is not None


def content_type(key: str) -> str:
    """The media type a valid key is served with, from its extension."""
    return CONTENT_TYPES[key.rsplit(".", 1)[1]]
