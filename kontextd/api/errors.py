"""How failures reach clients: every error is JSON in fal's shape, and nothing from a request body leaks.

FastAPI's own validation handler echoes each failing value whole (a 20 MB data URI, a 2 MB prompt) and
crashes on values JSON cannot carry (NaN, lone surrogates). Ours keeps fal's 422 shape, `{"detail": [{loc,
msg, type, input, ctx}]}`, with `input` cut down to something a person can read and any encoder can write.
Errors in headers are the client's transport, not its input: they answer 400 in the same shape.
"""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kontextd.jobs.store import StoreUnavailable
from kontextd.shown import ITEMS_SHOWN, shown, shown_text
from kontextd.storage.base import StorageUnavailable

log = logging.getLogger("kontextd.api")

RETRY_AFTER_SECONDS = 5  # a full disk or a busy database: worth retrying soon, not hammering
MAX_BODY_BYTES = 64 * 1024 * 1024  # a 20 MB image as a base64 data URI, with room to spare


def _detail(error: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "loc": [part if isinstance(part, int) else shown_text(str(part)) for part in error.get("loc", ())],
        "msg": shown_text(str(error.get("msg", ""))),
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
