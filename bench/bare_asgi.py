"""The baselines for status-poll throughput, under the same uvicorn as kontextd:

- `app`: a bare ASGI app (no framework) answering a fixed status-sized JSON body;
- `starlette_app`: a bare Starlette app answering the same body from one route shaped like kontextd's
  status route (`/{app_owner}/{app_alias}/requests/{request_id}/status`), so it pays Starlette's routing
  and response rendering and nothing else.

The body is what KONTEXTD_BENCH_BODY_FILE holds when that is set (bench/server_overhead.py writes there
the exact bytes kontextd answered for the polled request), else a status body of the same shape.
"""

import json
import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

DEFAULT_BODY = json.dumps(
    {
        "status": "IN_QUEUE",
        "request_id": "00000000-0000-0000-0000-000000000000",
        "response_url": "http://127.0.0.1/fal-ai/flux-pro/requests/00000000-0000-0000-0000-000000000000",
        "status_url": "http://127.0.0.1/fal-ai/flux-pro/requests/00000000-0000-0000-0000-000000000000/status",
        "cancel_url": "http://127.0.0.1/fal-ai/flux-pro/requests/00000000-0000-0000-0000-000000000000/cancel",
        "logs": None,
        "metrics": {},
        "queue_position": 0,
    }
).encode()
BODY_FILE = os.environ.get("KONTEXTD_BENCH_BODY_FILE")
BODY = Path(BODY_FILE).read_bytes() if BODY_FILE else DEFAULT_BODY
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope: dict, receive: object, send: object) -> None:
    if scope["type"] == "lifespan":  # uvicorn's lifespan "auto" probes for it: answer, not an error
        while True:
            message = await receive()  # type: ignore[operator]
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})  # type: ignore[operator]
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})  # type: ignore[operator]
                return
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 202, "headers": HEADERS})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": BODY})  # type: ignore[operator]


async def _status(request: Request) -> Response:
    return Response(BODY, status_code=202, media_type="application/json")


starlette_app = Starlette(
    routes=[
        Route("/{app_owner}/{app_alias}/requests/{request_id}/status", _status),
        Route("/", _status),  # what the benchmark waits on before it starts
    ]
)
