"""fal's storage upload API, so that fal-client's `upload_file` / `upload_image` / `upload(...,
repository="fal")` and JS `fal.storage.upload` (and Blobs inside `input`) store their files here:

* `POST /storage/auth/token` → `{token, token_type, base_url, expires_at}`: what fal-client asks first;
* `POST /files/upload`, the raw bytes, with that token (or an API key) → `{"access_url"}`;
* `POST /storage/upload/initiate` `{"content_type", "file_name"}` → `{"upload_url", "file_url"}`, then
  `PUT upload_url` with the bytes. The JS client sends that PUT with no key: the URL carries its own
  signature (kontextd.api.upload_signing), valid for minutes, for that one file and content type;
* the multipart variants (fal-client over 100 MiB, JS over 90 MB) are refused with 413: an upload is an
  input image, at most the size an image fetched from a URL may be (Settings.fetch_max_bytes).

Only images are accepted (JPEG, PNG, WebP, GIF), declared so and with the bytes to match. fal stores any
file, but kontextd stores inputs for image models and serves each back from its own origin: an HTML or
SVG file served from there would run script as that origin, and an image content type also means no web
page can POST a file here cross-site without a CORS preflight (which it does not get).

An upload belongs to the key that made it and expires like outputs (X-Fal-Object-Lifecycle-Preference,
else --output-ttl); the sweep deletes it then. It is recorded in the job store (owner, expiry) before its
bytes are stored. Its URL is `<base>/files/uploads/<uuid>.<ext>`, never named after the client's file
name: given back as an input it is read from storage, never fetched, and only for the key that uploaded it
(kontextd.api.own_files).
"""

import json
import logging
import math
import time
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, Field
from pydantic_core import PydanticCustomError

from kontextd.api.auth import authorization_header
from kontextd.api.deps import Owner, ServicesDep, owner_of
from kontextd.api.json_body import JsonRoute
from kontextd.api.queue import LIFECYCLE_PATTERN, MAX_OUTPUT_TTL_SECONDS
from kontextd.api.responses import Message, Responses, ValidationErrors
from kontextd.api.services import Services
from kontextd.api.upload_signing import TOKEN_SECONDS, UPLOAD_URL_SECONDS
from kontextd.storage import keys

log = logging.getLogger("kontextd.uploads")

# What may be uploaded: media type → the key's extension (which is what it is served as).
UPLOAD_TYPES = {"image/jpeg": "jpeg", "image/png": "png", "image/webp": "webp", "image/gif": "gif"}
_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg"}  # sent by some clients for JPEG
_ACCEPTED = ", ".join(UPLOAD_TYPES)
CORS_HEADERS = {"Access-Control-Allow-Origin": "*"}  # the upload URL is its own credential (see preflight)


def media_type(content_type: str | None) -> str | None:
    """The accepted media type `content_type` names (parameters and case aside), else None."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    media = _ALIASES.get(media, media)
    return media if media in UPLOAD_TYPES else None


def _looks_like(extension: str, data: bytes) -> bool:
    """Whether the bytes begin as a file of that format does (its signature): the content is checked
    against the declared type; decoding is the worker's, where every input image is decoded anyway."""
    if extension == "png":
        return data.startswith(b"\x89PNG\r\n\x1a\n")
    if extension == "jpeg":
        return data.startswith(b"\xff\xd8\xff")
    if extension == "gif":
        return data[:6] in (b"GIF87a", b"GIF89a")
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def _refused(status: int, loc: list[str], message: str, kind: str, **extra: Any) -> HTTPException:
    """An error in fal's validation shape: where, what is wrong, its type."""
    return HTTPException(status, [{"loc": loc, "msg": message, "type": kind, **extra}], headers=CORS_HEADERS)


def _unsupported(content_type: str | None) -> HTTPException:
    return _refused(
        415,
        ["header", "content-type"],
        f"Only images can be uploaded: send Content-Type {_ACCEPTED}",
        "unsupported_media_type",
        input=(content_type or "")[:100],
    )


def _too_large(limit: int) -> HTTPException:
    return _refused(
        413,
        ["body"],
        f"The file is too large: an upload is at most {limit} bytes (multipart uploads are not supported)",
        "file_too_large",
        ctx={"max_bytes": limit},
    )


def _header_ttl(name: str, value: str, default: float) -> float:
    """The lifetime a lifecycle header asks for: `expiration_duration_seconds` of its JSON object (fal-client
    may send only `initial_acl`: then the default), above 0 and at most a year."""
    try:
        preference = json.loads(value)
        # An object saying something: fal-client may send initial_acl alone (then the default lifetime).
        if not isinstance(preference, dict) or not preference.keys() & {
            "expiration_duration_seconds",
            "initial_acl",
        }:
            raise TypeError(preference)
        seconds = preference.get("expiration_duration_seconds", default)
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise TypeError(seconds)
    except (ValueError, TypeError, RecursionError) as error:
        message = 'expected JSON like {"expiration_duration_seconds": 3600}'
        raise _header_error(name, message, value) from error
    # Compared first: NaN fails it, and an integer too big for a float never reaches isfinite (which raises).
    if not (0 < seconds <= MAX_OUTPUT_TTL_SECONDS and math.isfinite(seconds)):
        message = (
            f"expiration_duration_seconds must be above 0 and at most {MAX_OUTPUT_TTL_SECONDS:.0f} (a year)"
        )
        raise _header_error(name, message, value)
    return float(seconds)


def _header_error(name: str, message: str, value: str) -> RequestValidationError:
    return RequestValidationError(
        [{"type": "value_error", "loc": ["header", name], "msg": message, "input": value}]
    )


def upload_ttl(services: Services, preference: str | None, lifecycle: str | None) -> float:
    """How long an upload is kept: as outputs are, unless a lifecycle header says otherwise (fal-client
    sends both headers alike, the JS client X-Fal-Object-Lifecycle alone)."""
    default = services.settings.output_ttl
    # Both are checked when both are sent: a malformed one is refused even where the other one wins.
    alternative = _header_ttl("x-fal-object-lifecycle", lifecycle, default) if lifecycle else default
    if preference:
        return _header_ttl("x-fal-object-lifecycle-preference", preference, default)
    return alternative


async def _body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to be over `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _check_content(extension: str, data: bytes) -> None:
    if not _looks_like(extension, data):
        raise _refused(
            415,
            ["body"],
            f"The bytes are not a {extension.upper()} image, as the Content-Type says they are",
            "unsupported_media_type",
        )


def _store_new(services: Services, key: str, owner: str, expires_at: float, data: bytes) -> None:
    # The record first: a crash in between leaves a record without its file, never a file no sweep knows.
    services.store.add_upload(key, owner, expires_at)
    services.storage.put(key, data, keys.content_type(key))


def _store_signed(services: Services, key: str, data: bytes) -> str | None:
    """Store the bytes of an initiated upload: its owner, or None when its record's time is up (then
    nothing is kept)."""
    if services.store.upload_owner(key, time.time()) is None:
        return None
    services.storage.put(key, data, keys.content_type(key))
    # The sweep may have forgotten the record while the bytes were written: then they go too, or nothing
    # would ever delete them.
    owner = services.store.upload_owner(key, time.time())
    if owner is None:
        services.storage.delete([key])
    return owner


def _logged(owner: str, route: str, extension: str, size: int) -> None:
    # Who, how and how much: never the file's bytes, its name, or its key (which is its URL).
    log.info("upload stored", extra={"owner": owner, "route": route, "format": extension, "bytes": size})


# -- routes ------------------------------------------------------------------------------------------


async def uploader(request: Request, authorization: str | None = Security(authorization_header)) -> str:
    """The owner of an upload: an upload token's (`Bearer <token>`, what fal-client sends) or an API key's."""
    services: Services = request.app.state.services
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() == "bearer":
        owner = services.uploads.token_owner(token.strip(), time.time())
        if owner is not None:
            return owner
    return owner_of(services, authorization)


UploadOwner = Annotated[str, Security(uploader)]

StorageType = Annotated[
    str | None,
    Query(description="fal's storage backend (`fal-cdn-v3`, `gcs`): accepted, and all alike here."),
]
LifecyclePreference = Annotated[
    str | None,
    Header(
        description='How long the upload is kept: {"expiration_duration_seconds": N}, N seconds above 0 and '
        "at most a year (other keys, such as fal's initial_acl, are ignored). Absent: as outputs are.",
        json_schema_extra={"pattern": LIFECYCLE_PATTERN},
    ),
]
Lifecycle = Annotated[
    str | None,
    Header(
        description="The same as X-Fal-Object-Lifecycle-Preference (the name fal's JS client sends), used "
        "when that is absent.",
        json_schema_extra={"pattern": LIFECYCLE_PATTERN},
    ),
]


class UploadToken(BaseModel):
    token: str = Field(description="Send as `Authorization: Bearer <token>` to POST /files/upload.")
    token_type: str = Field(description="Always `Bearer`.")
    base_url: str = Field(description="This server's base URL (where fal-client sends multipart uploads).")
    expires_at: str = Field(description="ISO 8601, with its UTC offset.")


class UploadedFile(BaseModel):
    access_url: str = Field(description="The file's URL: give it as an `image_url`.")


def _canonical_type(value: Any) -> Any:
    if isinstance(value, str) and (media := media_type(value)) is not None:
        return media
    if isinstance(value, str):
        raise PydanticCustomError(
            "unsupported_media_type",
            "Only images can be uploaded: {accepted}",
            {"accepted": _ACCEPTED},
        )
    return value


class InitiateUpload(BaseModel):
    content_type: Annotated[
        str,
        BeforeValidator(_canonical_type),
        Field(
            description="The file's media type: only images (case and parameters aside).",
            json_schema_extra={"enum": list(UPLOAD_TYPES)},
        ),
    ]
    file_name: str | None = Field(None, description="Accepted and ignored: stored files get names of ours.")


class InitiatedUpload(BaseModel):
    upload_url: str = Field(
        description=f"PUT the bytes here, with the same Content-Type and no key, within {UPLOAD_URL_SECONDS}"
        " s."
    )
    file_url: str = Field(description="The file's URL once stored: give it as an `image_url`.")


class StoredUpload(BaseModel):
    file_url: str


class UploadErrors(BaseModel):
    detail: list[Any] | str = Field(
        description="fal's shape: [{loc, msg, type, ...}]; a body over 64 MB is refused before any route, in "
        "a sentence."
    )


_IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The file's bytes.",
        "content": {media: {"schema": {"type": "string", "format": "binary"}} for media in UPLOAD_TYPES},
    }
}
_CONTENT_REFUSED: Responses = {
    413: {"model": UploadErrors, "description": "Larger than an input image may be"},
    415: {"model": ValidationErrors, "description": "Not an image type, or the bytes are not what it says"},
}
_BAD_HEADER: Responses = {400: {"model": ValidationErrors, "description": "A lifecycle header is invalid"}}
_UNAUTHORIZED: Responses = {
    401: {"model": Message, "description": "Missing or invalid API key or upload token"}
}
_UNAVAILABLE: Responses = {503: {"model": Message, "description": "The job store or the storage is down"}}
_MULTIPART: Responses = {
    413: {"model": ValidationErrors, "description": "Always: multipart uploads are not supported"}
}

router = APIRouter(route_class=JsonRoute)


@router.post(
    "/storage/auth/token",
    tags=["storage"],
    summary="An upload token (fal-client asks for one before uploading)",
    response_model=UploadToken,
    responses={**_UNAUTHORIZED, 422: {"model": ValidationErrors, "description": "A query parameter"}},
)
async def auth_token(
    request: Request, services: ServicesDep, owner: Owner, storage_type: StorageType = None
) -> UploadToken:
    expires = int(time.time()) + TOKEN_SECONDS
    return UploadToken(
        token=services.uploads.token(owner, expires),
        token_type="Bearer",
        base_url=services.urls.base(str(request.base_url)),
        expires_at=datetime.fromtimestamp(expires, UTC).isoformat(),
    )


@router.post(
    "/files/upload",
    tags=["storage"],
    summary="Upload a file's bytes (fal-client's upload_file, upload_image)",
    response_model=UploadedFile,
    openapi_extra=_IMAGE_BODY,
    responses={**_BAD_HEADER, **_UNAUTHORIZED, **_CONTENT_REFUSED, **_UNAVAILABLE},
)
async def upload_file(
    request: Request,
    services: ServicesDep,
    owner: UploadOwner,
    x_fal_file_name: Annotated[str | None, Header(description="Accepted and ignored.")] = None,
    x_fal_object_lifecycle_preference: LifecyclePreference = None,
    x_fal_object_lifecycle: Lifecycle = None,
) -> UploadedFile:
    content_type = request.headers.get("content-type")
    media = media_type(content_type)
    if media is None:
        raise _unsupported(content_type)
    extension = UPLOAD_TYPES[media]
    ttl = upload_ttl(services, x_fal_object_lifecycle_preference, x_fal_object_lifecycle)
    data = await _body(request, services.settings.fetch_max_bytes)
    _check_content(extension, data)
    key = keys.upload_key(extension)
    await run_in_threadpool(_store_new, services, key, owner, time.time() + ttl, data)
    _logged(owner, "direct", extension, len(data))
    return UploadedFile(access_url=services.urls.own_url(key, str(request.base_url)))


@router.post(
    "/storage/upload/initiate",
    tags=["storage"],
    summary="Start an upload: a signed URL to PUT the bytes to (the JS client, fal-client's repository fal)",
    response_model=InitiatedUpload,
    responses={
        **_BAD_HEADER,
        **_UNAUTHORIZED,
        415: {"model": Message, "description": "The body is not sent as JSON"},
        422: {"model": ValidationErrors, "description": "Not an image type, or the body is invalid"},
        **_UNAVAILABLE,
    },
)
async def initiate(
    request: Request,
    body: InitiateUpload,
    services: ServicesDep,
    owner: Owner,
    storage_type: StorageType = None,
    x_fal_object_lifecycle_preference: LifecyclePreference = None,
    x_fal_object_lifecycle: Lifecycle = None,
) -> InitiatedUpload:
    ttl = upload_ttl(services, x_fal_object_lifecycle_preference, x_fal_object_lifecycle)
    now = time.time()
    key = keys.upload_key(UPLOAD_TYPES[body.content_type])
    await run_in_threadpool(services.store.add_upload, key, owner, now + ttl)
    # Never outliving the record: bytes PUT after it is swept would be kept by nothing.
    expires = math.ceil(now + min(UPLOAD_URL_SECONDS, ttl))
    file_url = services.urls.own_url(key, str(request.base_url))
    signature = services.uploads.upload_signature(key, expires)
    return InitiatedUpload(
        upload_url=f"{file_url}?expires={expires}&signature={signature}", file_url=file_url
    )


async def put_upload(
    name: str,
    request: Request,
    services: ServicesDep,
    expires: Annotated[str | None, Query(description="Unix seconds the URL is valid until.")] = None,
    signature: Annotated[str | None, Query(description="The URL's signature.")] = None,
) -> JSONResponse:
    key = f"{keys.UPLOADS}/{name}"
    refusal = services.uploads.check_upload(key, expires, signature, time.time())
    if refusal is not None:
        raise _refused(403, ["query", refusal.field], refusal.reason, refusal.kind)
    extension = key.rsplit(".", 1)[1]
    content_type = request.headers.get("content-type")
    if media_type(content_type) != keys.content_type(key):
        raise _refused(
            415,
            ["header", "content-type"],
            f"This upload URL is for {keys.content_type(key)}: send that Content-Type",
            "unsupported_media_type",
            input=(content_type or "")[:100],
        )
    data = await _body(request, services.settings.fetch_max_bytes)
    _check_content(extension, data)
    owner = await run_in_threadpool(_store_signed, services, key, data)
    if owner is None:
        raise _refused(
            403, ["query", "expires"], "This upload has expired: initiate it again", "upload_url_expired"
        )
    _logged(owner, "signed", extension, len(data))
    file_url = services.urls.own_url(key, str(request.base_url))
    return JSONResponse({"file_url": file_url}, headers=CORS_HEADERS)


PUT_ROUTE: dict[str, Any] = {
    "tags": ["storage"],
    "summary": "Store an initiated upload's bytes at its signed URL (no key: its signature is the key)",
    "response_model": StoredUpload,
    "openapi_extra": _IMAGE_BODY,
    "responses": {
        403: {"model": ValidationErrors, "description": "Not a signed upload URL, forged, or expired"},
        **_CONTENT_REFUSED,
        **_UNAVAILABLE,
    },
}


async def preflight() -> Response:
    """CORS for the signed PUT: a browser app using the JS client PUTs to it directly (not through its
    proxy), from its own origin. Safe for any origin: the URL's signature is the only credential."""
    headers = {
        **CORS_HEADERS,
        "Access-Control-Allow-Methods": "PUT",
        "Access-Control-Allow-Headers": "content-type",
        "Access-Control-Max-Age": str(UPLOAD_URL_SECONDS),
    }
    return Response(status_code=204, headers=headers)


async def multipart() -> JSONResponse:
    """fal-client's (over 100 MiB) and the JS client's (over 90 MB) multipart uploads: larger than any
    input image may be here, so refused in fal's shape rather than half-implemented."""
    raise _refused(
        413,
        ["body"],
        "Multipart uploads are not supported: upload files of at most an input image's size in one request",
        "file_too_large",
    )


async def post_only() -> JSONResponse:
    """405 for the upload paths under /files/, which the files route (GET /files/{key}) would otherwise
    answer as a missing file."""
    return JSONResponse({"detail": "Method Not Allowed"}, status_code=405, headers={"Allow": "POST"})


for _path in ("/files/upload", "/files/upload/multipart"):
    router.add_api_route(
        _path, post_only, methods=["GET", "PUT", "DELETE", "PATCH", "OPTIONS"], include_in_schema=False
    )
for _path in ("/files/upload/multipart", "/storage/upload/initiate-multipart"):
    router.add_api_route(
        _path,
        multipart,
        methods=["POST"],
        tags=["storage"],
        summary="Multipart uploads: refused (uploads are input images, small enough for one request)",
        status_code=413,  # its only answer, documented as such
        responses=_MULTIPART,
        response_model=None,
    )
# The upload URL is the file's own URL, signed: PUT writes it (GET, the files route, reads it). One path
# segment after uploads/: no other /files/ path takes a PUT.
router.add_api_route(f"/files/{keys.UPLOADS}/{{name}}", put_upload, methods=["PUT"], **PUT_ROUTE)
router.add_api_route(
    f"/files/{keys.UPLOADS}/{{name}}", preflight, methods=["OPTIONS"], include_in_schema=False
)
