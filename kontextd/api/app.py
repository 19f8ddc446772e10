"""The ASGI application: routes and middleware over the services it is given, and nothing else: what runs
beside it (workers, dispatcher, sweeper) belongs to the runtime (kontextd.runtime)."""

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any, BinaryIO

from fastapi import APIRouter, FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.telemetry import TelemetryConfig
from fastapi_offline import FastAPIOffline

from kontextd import __version__
from kontextd.api import metrics_route, openai_images, playground, queue, uploads, usage
from kontextd.api.deps import Owner, ServicesDep
from kontextd.api.errors import MAX_BODY_BYTES, install_error_handlers
from kontextd.api.middleware import BodyLimit, TargetUrl, TrailingSlash
from kontextd.api.openapi import install_openapi
from kontextd.api.queue import RUN_PREFIX
from kontextd.api.responses import UNAUTHORIZED
from kontextd.api.services import Services
from kontextd.catalogue.endpoints import ENDPOINTS
from kontextd.jobs.store import StoreUnavailable
from kontextd.storage.base import StorageUnavailable

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]

# FastAPI's native OpenTelemetry looks up the global providers on every request (5 % of a status poll's
# CPU, docs/performance.md) even when none is configured. kontextd does not use it.
NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}

DESCRIPTION = """
Self-hosted FLUX.1 Kontext speaking the fal.ai queue API.

* **Queue** (this host's root): `POST /{app_id}` queues a request; follow it at
  `/{owner}/{alias}/requests/{id}/status`, `/status/stream`, `/{id}` (result) and `/cancel`.
* **Run** (`/run` prefix): `POST /run/{app_id}` waits and answers with the output itself.
* **Storage** (fal's upload API): `POST /storage/upload/initiate`, then PUT the bytes to the signed URL it
  answers; or `POST /storage/auth/token`, then `POST /files/upload`. Uploaded images are inputs.

Authenticate with `Authorization: Key <key>` or `Bearer <key>` when the server has API keys.
"""


def _chunks(stream: BinaryIO, size: int = 256 * 1024) -> Iterator[bytes]:
    with contextlib.closing(stream):
        while chunk := stream.read(size):
            yield chunk


async def health(services: ServicesDep) -> JSONResponse:
    """Readiness: loading, ready or failed (with why), and whether the job store and the storage answer
    now; also what `kontextd worker --health-port` serves."""
    store = await _answers(services.store.ping())
    storage = await _answers(run_in_threadpool(services.storage.check))
    body = services.readiness.describe() | {
        "workers": len(services.workers),
        "backends": {lane: readiness.state for lane, readiness in services.lanes.items()},
        "store": store,
        "storage": storage,
    }
    ready = services.readiness.state == "ready" and store == "ok"
    return JSONResponse(body, status_code=200 if ready else 503)


async def _answers(check: Awaitable[None]) -> str:
    try:
        await check
    except (StoreUnavailable, StorageUnavailable) as error:
        return f"unavailable: {error}"
    return "ok"


HEALTH_ROUTE: dict[str, Any] = {
    "tags": ["server"],
    "summary": "Readiness: loading, ready or failed (with why); whether the job store and storage answer",
    "description": "503 while the model loads or after it failed to, and while the job store cannot be "
    "used (down, or migrated by a newer kontextd: upgrade this node). Storage that cannot be reached is "
    "reported in `storage` but keeps the node ready: requests whose images cannot be stored are held and "
    "run again once it is back, and status polls, which need only the store, go on being answered.",
    "responses": {503: {"description": "Loading the model, failed to, or the job store is unavailable"}},
}


async def endpoints(services: ServicesDep, owner: Owner) -> dict[str, list[dict[str, str | None]]]:
    listed = []
    for endpoint in ENDPOINTS:
        route = services.routing.route(endpoint.app_id)
        lane = services.lanes.get(route.backend)
        if lane is not None:
            state, reason = lane.state, lane.reason
        elif services.store.shared:  # an API-only node: worker processes elsewhere serve the queue
            state, reason = "remote", "served by the worker processes sharing this store"
        else:
            state, reason = "stopped", None  # no workers in this process, and none can be elsewhere
        listed.append(
            {
                "app_id": endpoint.app_id,
                "title": endpoint.title,
                "backend": route.backend,
                "model": route.model,
                "status": state,
                "reason": reason,
            }
        )
    return {"endpoints": listed}


async def jwks(services: ServicesDep) -> dict[str, object]:
    return services.signer.jwks()


def files(key: str, services: ServicesDep) -> Response:
    stored = services.storage.open(key)  # StorageUnavailable (the object store down): a JSON 503
    if stored is None:
        return JSONResponse({"detail": "File not found"}, status_code=404)
    headers = {
        "Content-Length": str(stored.size),
        "Cache-Control": "private, max-age=31536000, immutable",
        "X-Content-Type-Options": "nosniff",
    }
    return StreamingResponse(_chunks(stored.stream), media_type=stored.content_type, headers=headers)


def _add_routes(app: FastAPI, router: APIRouter) -> None:
    """The router's routes as the app's own. FastAPI's include_router keeps the router as one entry that
    matches every request twice (once to select it, once inside it) and calls routes through a wrapper
    that skips LeanRoute's own ASGI app; a route added directly is matched once and run as built. The
    routers carry no prefix, dependencies or tags of their own to apply, and OpenAPI reads app.routes."""
    app.router.routes.extend(router.routes)


def create_app(services: Services, lifespan: Lifespan | None = None) -> FastAPI:
    """The HTTP API over `services`. What runs beside it (workers, dispatcher, sweeper) is the runtime's,
    handed in as `lifespan` by whoever runs the process (kontextd.server)."""
    # /docs and /redoc from assets inside the fastapi-offline package: they work with no internet.
    app = FastAPIOffline(
        title="kontextd",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        redirect_slashes=False,
        telemetry=NO_TELEMETRY,
    )
    app.state.services = services
    install_error_handlers(app)
    install_openapi(app)
    _add_routes(app, queue.polls)  # first: the routes asked most are matched first
    _add_routes(app, queue.router)
    _add_routes(app, uploads.router)  # fal's storage API: uploads are inputs, kept in our storage
    _add_routes(app, usage.router)  # GET /v1/usage: what each key used, per endpoint and day
    _add_routes(app, openai_images.router)  # OpenAI's Images API (/v1/images/*, /v1/models), same queue
    app.add_api_route("/health", health, methods=["GET"], **HEALTH_ROUTE)
    metrics_route.install(app, services)  # GET /metrics (Prometheus), behind the API key when there are keys
    playground.install(app)  # GET / (the web playground) and its assets under /playground/
    app.add_api_route(
        "/v1/endpoints",
        endpoints,
        methods=["GET"],
        tags=["server"],
        summary="Each endpoint: the backend and model serving it, and whether that backend is ready",
        responses=UNAUTHORIZED,
    )
    app.add_api_route(
        "/.well-known/jwks.json",
        jwks,
        methods=["GET"],
        tags=["server"],
        summary="Public keys that sign webhooks",
    )
    app.add_api_route(
        "/files/{key:path}",
        files,
        methods=["GET"],
        tags=["server"],
        summary="A stored output image, or an uploaded input image",
        response_class=StreamingResponse,
        responses={
            200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}, "image/gif": {}}},
            404: {"description": "No such file: never stored, expired, or not a name this server makes"},
            503: {"description": "The storage cannot be reached now"},
        },
    )
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(TrailingSlash)
    app.add_middleware(TargetUrl, run_prefix=RUN_PREFIX)  # outermost: the trailing-slash rule applies after
    return app


def create_health_app(services: Services, lifespan: Lifespan | None = None) -> FastAPI:
    """`kontextd worker --health-port`: /health alone, for a load balancer or an orchestrator's probe."""
    app = FastAPI(title="kontextd worker", version=__version__, lifespan=lifespan, openapi_url=None)
    app.state.services = services
    app.add_api_route("/health", health, methods=["GET"], **HEALTH_ROUTE)
    metrics_route.install(app, services)  # the worker's own metrics, beside its /health
    return app
