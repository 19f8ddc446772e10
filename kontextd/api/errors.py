"""How failures reach clients: every error is JSON in fal's shape, and nothing from a request body leaks."""

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from kontextd.jobs.store import StoreUnavailable

log = logging.getLogger("kontextd.api")

RETRY_AFTER_SECONDS = 5  # a full disk or a busy database: worth retrying soon, not hammering


async def _store_unavailable(request: Request, error: Exception) -> JSONResponse:
    # The message names the cause (disk full, busy) but never the request's contents.
    log.error("store unavailable", extra={"path": request.url.path, "reason": str(error)})
    return JSONResponse(
        {
            "detail": f"The server cannot accept requests right now: {error}",
            "error_type": "service_unavailable",
        },
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StoreUnavailable, _store_unavailable)
