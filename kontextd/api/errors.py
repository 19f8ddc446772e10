"""How failures reach clients: every error is JSON in fal's shape, and nothing from a request body leaks.

FastAPI's own validation handler echoes each failing value whole (a 20 MB data URI, a 2 MB prompt) and
crashes on values JSON cannot carry (NaN, lone surrogates). Ours keeps fal's 422 shape, `{"detail": [{loc,
msg, type, input, ctx}]}`, with `input` cut down to something a person can read and any encoder can write.
Errors in headers are the client's transport, not its input: they answer 400 in the same shape.
"""

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kontextd.jobs.store import StoreUnavailable
from kontextd.storage.base import StorageUnavailable

log = logging.getLogger("kontextd.api")

RETRY_AFTER_SECONDS = 5  # a full disk or a busy database: worth retrying soon, not hammering
MAX_BODY_BYTES = 64 * 1024 * 1024  # a 20 MB image as a base64 data URI, with room to spare

TEXT_SHOWN = 200  # characters of a string value echoed back in an error
ITEMS_SHOWN = 20  # entries of a list or object echoed back
DEPTH_SHOWN = 4


def shown(value: Any, depth: int = 0) -> Any:
    """A value from a request as an error may show it: bounded, JSON-safe, and never image bytes."""
    if isinstance(value, str):
        return _shown_text(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        digits = str(value)
        return value if len(digits) <= 40 else f"{digits[:20]}… ({len(digits)} digits)"
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    if depth >= DEPTH_SHOWN:
        return "…"
    if isinstance(value, dict):
        items = list(value.items())
        out = {_shown_text(str(key)): shown(item, depth + 1) for key, item in items[:ITEMS_SHOWN]}
        if len(items) > ITEMS_SHOWN:
            out["…"] = f"{len(items) - ITEMS_SHOWN} more"
        return out
    if isinstance(value, list | tuple):
        out_list = [shown(item, depth + 1) for item in value[:ITEMS_SHOWN]]
        if len(value) > ITEMS_SHOWN:
            out_list.append(f"… {len(value) - ITEMS_SHOWN} more")
        return out_list
    return _shown_text(str(value))  # an exception in ctx, a Decimal …


def _shown_text(text: str) -> str:
    if text[:5].lower() == "data:":
        header = text[: min(text.find(",") + 1 or len(text), 100)]
        return f"{header}… ({len(text)} characters)"
    if len(text) > TEXT_SHOWN:
        text = f"{text[:TEXT_SHOWN]}… ({len(text)} characters)"
    # Lone surrogates cannot be written as UTF-8: show them as escapes.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _detail(error: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "loc": [part if isinstance(part, int) else _shown_text(str(part)) for part in error.get("loc", ())],
        "msg": _shown_text(str(error.get("msg", ""))),
        "type": str(error.get("type", "value_error")),
    }
    if "input" in error:
        entry["input"] = shown(error["input"])
    if error.get("ctx"):
        entry["ctx"] = shown(error["ctx"])
    return entry


async def _validation_failed(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    detail = [_detail(entry) for entry in error.errors()]
    in_headers = any(entry["loc"][:1] == ["header"] for entry in detail)
    # Field names and types only: the values stay out of the log.
    log.info(
        "request refused",
        extra={
            "path": request.url.path,
            "fields": [".".join(str(part) for part in entry["loc"]) for entry in detail][:ITEMS_SHOWN],
            "types": sorted({entry["type"] for entry in detail}),
        },
    )
    return JSONResponse({"detail": detail}, status_code=400 if in_headers else 422)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)


async def _unavailable(request: Request, error: Exception) -> JSONResponse:
    # The job store (disk full, database down) or the image storage (object store down). The message names
    # the cause but never the request's contents.
    part = "store" if isinstance(error, StoreUnavailable) else "storage"
    log.error(f"{part} unavailable", extra={"path": request.url.path, "reason": str(error)})
    return JSONResponse(
        {
            "detail": f"The server cannot serve this right now: {error}",
            "error_type": "service_unavailable",
        },
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    # The traceback is logged by the server (kontextd.logs keeps exception messages out of it).
    return JSONResponse(
        {"detail": "Internal server error", "error_type": "internal_server_error"}, status_code=500
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_failed)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(StoreUnavailable, _unavailable)
    app.add_exception_handler(StorageUnavailable, _unavailable)
    app.add_exception_handler(Exception, _unexpected)
