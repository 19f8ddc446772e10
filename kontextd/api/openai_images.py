"""OpenAI's Images API over the Kontext endpoints, so the unmodified `openai` package works against kontextd:

* `POST /v1/images/generations` (JSON) and `POST /v1/images/edits` (multipart: `image` or `image[]`);
* `GET /v1/models`: the short names and the app ids `model` takes.

Each request becomes a request of one Kontext endpoint, built through that endpoint's own input model (all of
its validation applies) and queued like any other: it is durable, and visible at the fal queue's status
URL of the request id answered in `x-request-id` / `x-fal-request-id`. Errors are in OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with the parameter named as OpenAI names it.

Not served: masks (Kontext edits follow the prompt; inpainting has its own endpoint), `webp` (Kontext
writes png or jpeg), transparent backgrounds. `quality`, `background`, `moderation`, `style`,
`output_compression` and `user` are accepted and ignored. `partial_images` are the live previews (small,
rough JPEGs of the running request), at most that many, then a completed event per image.
"""

import asyncio
import base64
import io
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import PIL.Image
from fastapi import APIRouter, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from kontextd.api.auth import authorization_header
from kontextd.api.deps import ServicesDep
from kontextd.api.json_body import is_json, loads

# The queue's own job creation and wait: an OpenAI request is a queue request like any other.
from kontextd.api.queue import POLL_FALLBACK_SECONDS, _new_job, _wait_until_completed
from kontextd.api.services import Services
from kontextd.catalogue.endpoints import BY_APP_ID, Endpoint
from kontextd.catalogue.schemas import (
    ASPECT_RATIOS,
    MAX_REFERENCE_IMAGES,
    RESOLUTION_RATIOS,
    ImageDimensions,
    Integer,
    Prompt,
    nearest_ratio,
)
from kontextd.jobs.model import Job
from kontextd.jobs.store import StoreUnavailable
from kontextd.shown import shown_text
from kontextd.storage.base import StorageUnavailable
from kontextd.storage.urls import KEY_FIELD

CREATED = 1751328000  # 2025-07-01, for /v1/models: the models' "created" is fixed, not this process's start
OWNED_BY = "black-forest-labs"
MAX_IMAGES = 4  # num_images' maximum on every Kontext endpoint (OpenAI allows 10)
MAX_SIDE = 14142  # ImageDimensions' bound; larger sizes keep their shape, scaled down to it
SIZE_PATTERN = r"^(auto|[1-9][0-9]{0,4}x[1-9][0-9]{0,4})$"  # checked with fullmatch: `$` is the end alone
_SIZE = re.compile(SIZE_PATTERN[1:-1])

# Short name → (text to image, edit of one image, edit of 2-4 images or None).
MODELS: dict[str, tuple[str, str, str | None]] = {
    "flux-kontext-pro": (
        "fal-ai/flux-pro/kontext/text-to-image",
        "fal-ai/flux-pro/kontext",
        "fal-ai/flux-pro/kontext/multi",
    ),
    "flux-kontext-max": (
        "fal-ai/flux-pro/kontext/max/text-to-image",
        "fal-ai/flux-pro/kontext/max",
        "fal-ai/flux-pro/kontext/max/multi",
    ),
    # [dev] has no text-to-image endpoint of its own: the LoRA one, with no LoRAs, is the plain dev model.
    "flux-kontext-dev": ("fal-ai/flux-kontext-lora/text-to-image", "fal-ai/flux-kontext/dev", None),
}
DEFAULT_MODEL = "flux-kontext-pro"
GENERATION_APPS = tuple(sorted({models[0] for models in MODELS.values()}))
EDIT_APPS = (
    "fal-ai/flux-pro/kontext",
    "fal-ai/flux-pro/kontext/max",
    "fal-ai/flux-pro/kontext/multi",
    "fal-ai/flux-pro/kontext/max/multi",
    "fal-ai/flux-kontext/dev",
    "fal-ai/flux-kontext-lora",
)
GENERATION_MODELS = (*MODELS, *GENERATION_APPS)
# The models whose edits take one image: the rest take 1 to 4.
ONE_IMAGE_MODELS = ("flux-kontext-dev", *(app for app in EDIT_APPS if not app.endswith("/multi")))
EDIT_MODELS = (*MODELS, *EDIT_APPS)
assert set(GENERATION_APPS) | set(EDIT_APPS) <= set(BY_APP_ID)

# Kontext field → the OpenAI parameter a client set it with.
PARAMS = {
    "num_images": "n",
    "aspect_ratio": "size",
    "resolution_mode": "size",
    "image_size": "size",
    "image_url": "image",
    "image_urls": "image",
}
IMAGE_SIGNATURES = {  # what an input image may be, told by its first bytes (the declared type is ignored)
    b"\x89PNG\r\n\x1a\n": "image/png",
    b"\xff\xd8\xff": "image/jpeg",
    b"GIF87a": "image/gif",
    b"GIF89a": "image/gif",
}


def _check_size(value: str) -> str:
    if not _SIZE.fullmatch(value):
        raise PydanticCustomError("invalid_size", "must be auto or WIDTHxHEIGHT, e.g. 1536x1024")
    return value


class OpenAIError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers: dict[str, str] = {}

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class ImageOptions(BaseModel):
    """What both operations take (OpenAI's names); anything else OpenAI defines is accepted and ignored."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    prompt: Prompt
    # Any text: a model this server does not have is OpenAI's 404 model_not_found, not a 400.
    model: str = Field(DEFAULT_MODEL, description="A short name or an app id.")
    n: Annotated[int, Field(ge=1, le=MAX_IMAGES), Integer] | None = Field(
        None, description="Images to make (1 to 4; default 1)."
    )
    size: Annotated[str, AfterValidator(_check_size)] | None = Field(
        None,
        description="auto (the endpoint's default shape) or WIDTHxHEIGHT: made at the nearest Kontext aspect "
        "ratio, about one megapixel; the answer's `size` is what was made.",
        json_schema_extra={"pattern": SIZE_PATTERN},
    )
    response_format: Literal["b64_json", "url"] | None = Field(None, description="Default b64_json.")
    output_format: Literal["png", "jpeg"] | None = Field(None, description="Default png (no webp).")
    stream: bool | None = Field(
        None, description="Server-sent events: `*.partial_image` previews, then `*.completed` per image."
    )
    partial_images: Annotated[int, Field(ge=0, le=3), Integer] | None = Field(
        None, description="With stream: at most this many live previews, as partial_image events."
    )


class GenerationRequest(ImageOptions):
    model: str = Field(
        DEFAULT_MODEL,
        description="A short name or a text-to-image app id.",
        json_schema_extra={"enum": list(GENERATION_MODELS)},
    )


class EditOptions(ImageOptions):
    model: str = Field(
        DEFAULT_MODEL,
        description="A short name or an edit app id. flux-kontext-dev, fal-ai/flux-kontext/dev, "
        "fal-ai/flux-kontext-lora, fal-ai/flux-pro/kontext and …/max take one image; the short names pro and "
        "max take 1 to 4 (2 to 4 go to the multi endpoints), as do the multi app ids.",
        json_schema_extra={"enum": list(EDIT_MODELS)},
    )


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: Literal["png", "jpeg"]
    size: str = Field(description="WIDTHxHEIGHT of the images made.")


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelEntry]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorResponse(BaseModel):
    error: ErrorBody


def _owner(services: Services, authorization: str | None, form: bool = False) -> str:
    if form and not authorization:
        # Any web page may POST a multipart form cross-site without a CORS preflight, but cannot add this
        # header: required even on a server with no keys, so no page can queue work on a local one.
        raise OpenAIError(401, "Send an Authorization header (any value when the server has no keys)")
    owner = services.authenticator.owner_for(authorization)
    if owner is None:
        error = OpenAIError(401, "Incorrect API key provided", code="invalid_api_key")
        error.headers["WWW-Authenticate"] = "Bearer"
        raise error
    return owner


def _invalid(error: ValidationError) -> OpenAIError:
    """The first error, naming the OpenAI parameter; messages only, never the values sent."""
    first = error.errors(include_url=False, include_input=False)[0]
    loc = [str(part) for part in first.get("loc", ()) if not isinstance(part, int)]
    name = loc[0] if loc else None
    param = PARAMS.get(name, name) if name else None
    message = shown_text(str(first.get("msg", "invalid value")))
    return OpenAIError(400, f"{param}: {message}" if param else message, param, str(first.get("type")))


def _endpoint(name: str, images: int) -> Endpoint:
    """The endpoint a model and a number of input images (0: text to image) go to."""
    if name in MODELS:
        text, single, multi = MODELS[name]
        if images == 0:
            return BY_APP_ID[text]
        if images > 1:
            if multi is None:
                raise OpenAIError(400, f"{name} edits one image", "image", "too_many_images")
            return BY_APP_ID[multi]
        return BY_APP_ID[single]
    endpoint = BY_APP_ID.get(name)
    allowed = EDIT_APPS if images else GENERATION_APPS
    if endpoint is None or name not in allowed:
        what = "an edit" if images else "a text-to-image"
        message = f"The model '{shown_text(name)}' does not exist here ({what} model: see /v1/models)"
        raise OpenAIError(404, message, "model", "model_not_found")
    if images > 1 and name in ONE_IMAGE_MODELS:
        raise OpenAIError(400, f"{name} edits one image", "image", "too_many_images")
    return endpoint


def _shape(endpoint: Endpoint, size: str | None) -> dict[str, Any]:
    """`size` as the endpoint's shape field: its nearest aspect ratio (Kontext makes about 1 MP)."""
    if size is None or size == "auto":
        return {}
    width, height = (int(side) for side in size.split("x"))
    fields = endpoint.input_model.model_fields
    if "image_size" in fields and "aspect_ratio" not in fields and "resolution_mode" not in fields:
        scale = min(1.0, MAX_SIDE / max(width, height))  # the shape is what counts, not the pixels
        return {
            "image_size": {"width": max(1, round(width * scale)), "height": max(1, round(height * scale))}
        }
    dimensions = ImageDimensions.model_construct(width=width, height=height)
    if "resolution_mode" in fields:
        return {"resolution_mode": nearest_ratio(dimensions, RESOLUTION_RATIOS)}
    return {"aspect_ratio": nearest_ratio(dimensions, ASPECT_RATIOS)}


def _kontext_input(endpoint: Endpoint, options: ImageOptions, images: list[str]) -> dict[str, Any]:
    """The endpoint's input, validated by its own model: every check of the fal routes applies."""
    body: dict[str, Any] = {
        "prompt": options.prompt,
        "num_images": options.n or 1,
        "output_format": options.output_format or "png",
        **_shape(endpoint, options.size),
    }
    if images:
        multi = "image_urls" in endpoint.input_model.model_fields
        body |= {"image_urls": images} if multi else {"image_url": images[0]}
    try:
        return endpoint.input_model.model_validate(body).model_dump(mode="json")
    except ValidationError as error:
        raise _invalid(error) from None


@dataclass
class Submitted:
    job_id: str
    owner: str
    headers: dict[str, str]


async def _submit(services: Services, endpoint: Endpoint, body: dict[str, Any], owner: str) -> Submitted:
    job = _new_job(services, endpoint, body, owner, None, None, None, None, None, None)
    try:
        await run_in_threadpool(services.store.submit, job)
    except StoreUnavailable as error:
        raise _unavailable(error) from None
    services.wake_workers(job.lane)  # this process's; other processes hear of it through the store
    headers = {"x-request-id": job.request_id, "x-fal-request-id": job.request_id}
    return Submitted(job.request_id, owner, headers)


def _unavailable(error: Exception) -> OpenAIError:
    unavailable = OpenAIError(503, f"The server cannot serve this right now: {error}", None, "unavailable")
    unavailable.headers["Retry-After"] = "5"
    return unavailable


def _failure(job: Job) -> OpenAIError:
    """A request that ended without images, as OpenAI reports it (a refused input is a 400)."""
    assert job.outcome is not None
    status = 400 if job.outcome.status_code == 422 else job.outcome.status_code
    message = shown_text(job.outcome.error or "The request failed")
    return OpenAIError(status, message, None, job.outcome.error_type)


def _read_stored(services: Services, key: str) -> bytes:
    stored = services.storage.open(key)
    if stored is None:  # removed between completion and now: the storage lost it
        raise StorageUnavailable(f"output {key} is missing")
    with stored.stream:
        return stored.stream.read()


async def _image_data(services: Services, request: Request, image: dict[str, Any], as_url: bool) -> ImageData:
    key = image.get(KEY_FIELD)
    url = image.get("url")
    if as_url:
        return ImageData(url=services.urls.url(key, str(request.base_url)) if key else url)
    if key:
        data = await run_in_threadpool(_read_stored, services, key)
        return ImageData(b64_json=base64.b64encode(data).decode())
    return ImageData(b64_json=str(url).partition(",")[2])  # a data URI already


async def _answer(
    services: Services, request: Request, submitted: Submitted, options: ImageOptions
) -> tuple[Job, list[ImageData]]:
    job = await _wait_until_completed(services, submitted.job_id, submitted.owner)
    if job.outcome is None or not job.outcome.ok:
        raise _failure(job)
    if not job.outcome.body.get("images"):  # never from a model that ran; an upstream's odd answer
        raise OpenAIError(502, "The model answered no images", None, "no_images")
    as_url = options.response_format == "url"
    try:
        images = [await _image_data(services, request, image, as_url) for image in job.outcome.body["images"]]
    except StorageUnavailable as error:
        raise _unavailable(error) from None
    return job, images


def _size_and_format(job: Job) -> tuple[str, str]:
    assert job.outcome is not None
    first = job.outcome.body["images"][0]
    output_format = "jpeg" if first.get("content_type") == "image/jpeg" else "png"
    return f"{first['width']}x{first['height']}", output_format


async def _respond(
    services: Services, request: Request, submitted: Submitted, options: ImageOptions, event: str
) -> JSONResponse | StreamingResponse:
    if options.stream:
        events = _events(services, request, submitted, options, event)
        headers = submitted.headers | {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    try:
        job, images = await _answer(services, request, submitted, options)
    except OpenAIError as error:
        error.headers |= submitted.headers
        return error.response()
    size, output_format = _size_and_format(job)
    body = ImagesResponse(created=int(time.time()), data=images, output_format=output_format, size=size)
    return JSONResponse(body.model_dump(exclude_none=True), headers=submitted.headers)


async def _events(
    services: Services, request: Request, submitted: Submitted, options: ImageOptions, event: str
) -> AsyncIterator[str]:
    """Up to `partial_images` `<event>.partial_image` events from the live previews while it runs, then
    `<event>.completed` per image (`: ping` comments in between); a failure is one event with OpenAI's
    error body, which the SDK raises."""
    answer = asyncio.ensure_future(_answer(services, request, submitted, options))
    feed = services.feed
    assert feed is not None
    sent, last_preview, last_write = 0, None, time.monotonic()
    try:
        while not answer.done():
            waiter = feed.watch(submitted.job_id)  # before reading: a change in between is not missed
            if sent < (options.partial_images or 0):
                preview = await _preview(services, submitted.job_id)
                if preview is not None and preview != last_preview:
                    last_preview = preview
                    if partial := _partial(event, preview, sent):
                        yield partial
                        sent, last_write = sent + 1, time.monotonic()
            if time.monotonic() - last_write >= services.settings.sse_ping_interval:
                yield ": ping\n\n"
                last_write = time.monotonic()
            await asyncio.wait({answer, waiter}, timeout=POLL_FALLBACK_SECONDS)
            await feed.wait(submitted.job_id, waiter, 0)  # only forgets the waiter
        job, images = answer.result()
    except OpenAIError as error:
        yield f"event: error\ndata: {error.response().body.decode()}\n\n"
        return
    finally:
        answer.cancel()
    size, output_format = _size_and_format(job)
    for image in images:
        completed = {
            "type": f"{event}.completed",
            "b64_json": image.b64_json or "",
            "url": image.url,
            "created_at": int(time.time()),
            "size": size,
            "quality": "auto",
            "background": "opaque",
            "output_format": output_format,
            "usage": {
                "input_tokens": 0,
                "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                "output_tokens": 0,
                "total_tokens": 0,
            },
        }
        yield f"event: {event}.completed\ndata: {json.dumps(completed)}\n\n"


async def _preview(services: Services, job_id: str) -> str | None:
    """The running request's latest preview (a JPEG data URI); None when there is none, or none now."""
    try:
        return await run_in_threadpool(services.store.preview, job_id)
    except StoreUnavailable:  # a preview skipped: the request itself is safe
        return None


def _partial(event: str, preview: str, index: int) -> str | None:
    try:
        data = base64.b64decode(preview.partition(",")[2])
        with PIL.Image.open(io.BytesIO(data)) as image:  # reads the header only
            width, height = image.size
    except (ValueError, OSError):  # not an image after all: skipped, the stream goes on
        return None
    partial = {
        "type": f"{event}.partial_image",
        "b64_json": base64.b64encode(data).decode(),
        "partial_image_index": index,
        "created_at": int(time.time()),
        "size": f"{width}x{height}",
        "quality": "auto",
        "background": "opaque",
        "output_format": "jpeg",
    }
    return f"event: {event}.partial_image\ndata: {json.dumps(partial)}\n\n"


Authorization = Annotated[str | None, Security(authorization_header)]


async def generations(
    request: Request, services: ServicesDep, authorization: Authorization = None
) -> JSONResponse | StreamingResponse:
    try:
        owner = _owner(services, authorization)
        if not is_json(request.headers.get("content-type")):
            raise OpenAIError(415, "Send the body as JSON (Content-Type: application/json)")
        try:
            raw = loads(await request.body())
        except HTTPException as error:  # over the body limit (BodyLimit), said in OpenAI's shape
            raise OpenAIError(error.status_code, str(error.detail), None, "body_too_large") from None
        except json.JSONDecodeError as error:
            raise OpenAIError(400, f"The body is not valid JSON: {error.msg}", None, "invalid_json") from None
        try:
            options = GenerationRequest.model_validate(raw)
        except ValidationError as error:
            raise _invalid(error) from None
        endpoint = _endpoint(options.model, 0)
        submitted = await _submit(services, endpoint, _kontext_input(endpoint, options, []), owner)
    except OpenAIError as error:
        return error.response()
    return await _respond(services, request, submitted, options, "image_generation")


def _sniffed(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((kind for magic, kind in IMAGE_SIGNATURES.items() if data.startswith(magic)), None)


async def _edit_form(request: Request, limit: int) -> tuple[dict[str, str], list[str]]:
    """The form's fields and its images (`image`, or `image[]` as the SDK names several) as data URIs."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise OpenAIError(415, "Send the edit as multipart/form-data")
    try:
        form = await request.form(max_files=MAX_REFERENCE_IMAGES + 1, max_fields=64)
    except HTTPException as error:  # a malformed body, too many parts, or over the body limit
        status = 413 if error.status_code == 413 else 400
        raise OpenAIError(status, shown_text(str(error.detail)), None, "invalid_form") from None
    fields: dict[str, str] = {}
    images: list[str] = []
    try:
        for name, value in form.multi_items():
            if name in ("image", "image[]"):
                if not isinstance(value, UploadFile):
                    raise OpenAIError(400, "image: send each image as a file", "image", "invalid_image")
                images.append(await _data_uri(value, limit))
            elif name in ("mask", "markup"):
                message = f"{name}: not supported by Kontext edits"
                raise OpenAIError(400, message, name, "unsupported_parameter")
            elif name in fields:  # one value each: a list sent as repeated parts is no value OpenAI takes
                raise OpenAIError(400, f"{name}: given more than once", name, "invalid_value")
            elif isinstance(value, str):
                fields[name] = value
    finally:
        await form.close()  # the spooled files, now copied into the data URIs
    if not images:
        raise OpenAIError(400, "image: at least one image is required", "image", "missing_required_parameter")
    if len(images) > MAX_REFERENCE_IMAGES:
        message = f"image: at most {MAX_REFERENCE_IMAGES} images"
        raise OpenAIError(400, message, "image", "too_many_images")
    return fields, images


async def _data_uri(upload: UploadFile, limit: int) -> str:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise OpenAIError(413, f"image: each image is at most {limit} bytes", "image", "image_too_large")
    kind = _sniffed(data)
    if kind is None:
        raise OpenAIError(400, "image: not a PNG, JPEG, WebP or GIF image", "image", "invalid_image")
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def _form_options(fields: dict[str, str]) -> EditOptions:
    """Form values are text: numbers and booleans parsed as OpenAI's form encoding writes them."""
    values: dict[str, Any] = dict(fields)
    for name in ("n", "partial_images"):
        if name in values:
            try:  # "2", or "2.0" as some encoders write a JSON integer
                number = float(values[name])
                values[name] = int(number) if number.is_integer() else number
            except (ValueError, OverflowError):
                raise OpenAIError(400, f"{name}: must be an integer", name, "invalid_type") from None
    if "stream" in values:
        if values["stream"] not in ("true", "false"):
            raise OpenAIError(400, "stream: must be true or false", "stream", "invalid_type")
        values["stream"] = values["stream"] == "true"
    try:
        return EditOptions.model_validate(values)
    except ValidationError as error:
        raise _invalid(error) from None


async def edits(
    request: Request, services: ServicesDep, authorization: Authorization = None
) -> JSONResponse | StreamingResponse:
    try:
        owner = _owner(services, authorization, form=True)
        fields, images = await _edit_form(request, services.settings.fetch_max_bytes)
        options = _form_options(fields)
        endpoint = _endpoint(options.model, len(images))
        submitted = await _submit(services, endpoint, _kontext_input(endpoint, options, images), owner)
    except OpenAIError as error:
        return error.response()
    return await _respond(services, request, submitted, options, "image_edit")


async def models(services: ServicesDep, authorization: Authorization = None) -> JSONResponse:
    try:
        _owner(services, authorization)
    except OpenAIError as error:
        return error.response()
    names = (*MODELS, *GENERATION_APPS, *EDIT_APPS)
    listed = [ModelEntry(id=name, object="model", created=CREATED, owned_by=OWNED_BY) for name in names]
    return JSONResponse(ModelList(object="list", data=listed).model_dump())


def _error(description: str) -> dict[str, Any]:
    return {"model": OpenAIErrorResponse, "description": description}


ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("An invalid parameter (named in `param`), or the request failed on its input"),
    401: _error("Missing or invalid API key"),
    404: _error("No such model (`model_not_found`)"),
    413: _error("Body larger than 64 MB, or an image larger than the server's image limit"),
    415: _error("Not sent as the operation's content type"),
    503: _error("The server cannot take requests now; retry after Retry-After seconds"),
    "5XX": _error("The request failed on the server or an upstream"),
}
IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {}},
        "description": "The images; with stream=true, server-sent `*.completed` events instead",
    },
    **ERRORS,
}
_REQUEST_ID = {
    "description": "The request id: also at the fal queue's status URL",
    "schema": {"type": "string"},
}
IMAGE_RESPONSES[200]["headers"] = {"x-request-id": _REQUEST_ID, "x-fal-request-id": _REQUEST_ID}


def _never_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A form field is absent or text, never JSON null: its schema without the null option."""
    options = [option for option in schema.get("anyOf", []) if option.get("type") != "null"]
    if len(options) != 1:
        return schema
    return {**options[0], **{key: value for key, value in schema.items() if key not in ("anyOf", "default")}}


_FORM_FIELDS = {
    name: _never_null(schema)
    for name, schema in EditOptions.model_json_schema()["properties"].items()
    if name not in ("stream", "n", "partial_images")
}
EDIT_FORM: dict[str, Any] = {
    "type": "object",
    "required": ["image", "prompt"],
    "properties": {
        "image": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "minItems": 1,
            "maxItems": MAX_REFERENCE_IMAGES,
            "description": "1 to 4 PNG, JPEG, WebP or GIF files, each a file part (`image[]`, as the openai "
            "SDK names several, is taken too).",
        },
        **_FORM_FIELDS,
        "n": {"type": "integer", "minimum": 1, "maximum": MAX_IMAGES},
        "partial_images": {"type": "integer", "minimum": 0, "maximum": 3},
        "stream": {"type": "boolean"},
    },
}

router = APIRouter()
router.add_api_route(
    "/v1/images/generations",
    generations,
    methods=["POST"],
    tags=["openai"],
    summary="OpenAI Images API: generate images from a prompt",
    response_model=ImagesResponse,
    responses=IMAGE_RESPONSES,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": GenerationRequest.model_json_schema()}},
        }
    },
)
router.add_api_route(
    "/v1/images/edits",
    edits,
    methods=["POST"],
    tags=["openai"],
    summary="OpenAI Images API: edit images from a prompt (multipart)",
    response_model=ImagesResponse,
    responses=IMAGE_RESPONSES,
    openapi_extra={
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": EDIT_FORM}}}
    },
)
router.add_api_route(
    "/v1/models",
    models,
    methods=["GET"],
    tags=["openai"],
    summary="OpenAI Images API: the models `model` takes (short names and app ids)",
    response_model=ModelList,
    responses={401: ERRORS[401]},
)
