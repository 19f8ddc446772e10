"""The ASGI application: routes, middleware, and the background work tied to its lifetime."""

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import BinaryIO

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from PIL import Image

from kontextd import __version__
from kontextd.api.changes import ChangeFeed
from kontextd.api.errors import MAX_BODY_BYTES, install_error_handlers
from kontextd.api.middleware import BodyLimit, TargetUrl, TrailingSlash
from kontextd.api.openapi import install_openapi
from kontextd.api.queue import RUN_PREFIX, build_queue_router
from kontextd.api.responses import UNAUTHORIZED
from kontextd.api.services import Readiness, Services
from kontextd.backends import BackendUnavailable, load_backend
from kontextd.backends.base import Backend
from kontextd.backends.upstream import UpstreamBackend, build_upstream
from kontextd.catalogue.endpoints import ENDPOINTS
from kontextd.fetch.guard import FetchError
from kontextd.fetch.images import decode_image, load_image
from kontextd.routing import LOCAL
from kontextd.storage import keys
from kontextd.webhooks.delivery import WebhookDispatcher
from kontextd.worker.housekeeping import sweep_forever
from kontextd.worker.runner import Worker

log = logging.getLogger("kontextd.app")

IMAGE_LOAD_TIMEOUT = 120.0  # upper bound on the guard's own limits, so a worker can never hang on a fetch

DESCRIPTION = """
Self-hosted FLUX.1 Kontext speaking the fal.ai queue API.

* **Queue** (this host's root): `POST /{app_id}` queues a request; follow it at
  `/{owner}/{alias}/requests/{id}/status`, `/status/stream`, `/{id}` (result) and `/cancel`.
* **Run** (`/run` prefix): `POST /run/{app_id}` waits and answers with the output itself.

Authenticate with `Authorization: Key <key>` or `Bearer <key>` when the server has API keys.
"""


def _chunks(stream: BinaryIO, size: int = 256 * 1024) -> Iterator[bytes]:
    with stream:
        while chunk := stream.read(size):
            yield chunk


def _stored_image(services: Services, key: str) -> Image.Image:
    """One of our own outputs given back as an input: read from storage, never fetched over HTTP."""
    if not keys.is_valid(key):  # decided by the grammar alone: says nothing about which files exist
        raise FetchError("file_download_error", "That URL is not a file this server stored")
    stored = services.storage.open(key)
    if stored is None:
        raise FetchError("file_download_error", "That output of this server no longer exists (expired?)")
    with stored.stream:
        return decode_image(stored.stream.read())


def create_app(services: Services) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        services.feed = ChangeFeed(loop)
        stop_threads = threading.Event()
        stop_tasks = asyncio.Event()

        own_files = services.settings.base_url + "/files/"

        def fetch_image(url: str) -> Image.Image:
            if url.startswith(own_files):  # one of our outputs, edited again: read it from storage
                return _stored_image(services, url.removeprefix(own_files))
            # Workers are threads; the guard's HTTP client lives on the event loop.
            return asyncio.run_coroutine_threadsafe(load_image(url, services.fetcher), loop).result(
                IMAGE_LOAD_TIMEOUT
            )

        threads: list[threading.Thread] = []
        upstreams: list[UpstreamBackend] = []

        def start_workers(lane: str, backend: Backend, count: int, first: int = 0) -> None:
            for index in range(first, first + count):
                worker = Worker(
                    worker_id=f"{services.instance_id}-{lane}-{index}",
                    store=services.store,
                    backend=backend,
                    lane=lane,
                    models=lambda app_id: services.routing.route(app_id).model,
                    storage=services.storage,
                    load_image=fetch_image,
                    notify=services.notify,
                    lease_seconds=services.settings.lease_seconds,
                )
                services.workers.append(worker)
                thread = threading.Thread(
                    target=worker.run_forever, args=(stop_threads,), name=f"{lane}-{index}", daemon=True
                )
                thread.start()
                threads.append(thread)

        def load_then_work() -> None:
            """Load and warm up one pipeline per device slot off the event loop, then start one worker on
            each; meanwhile requests queue and /health says loading."""
            started = time.perf_counter()
            plan = services.plan
            backends = []
            for slot in plan.slots:
                where = f"{slot.device}: " if len(plan.slots) > 1 else ""  # which of several failed
                try:
                    backend = load_backend(plan, slot, tiny_step_seconds=services.settings.tiny_step_seconds)
                    warming = time.perf_counter()
                    backend.warm_up()  # compilation and first-call costs, before any request
                except BackendUnavailable as error:
                    services.readiness.fail(where + str(error))
                    log.error("backend unavailable", extra={"reason": str(error), "device": slot.device})
                    return
                except Exception as error:  # report any loading failure on /health rather than dying silently
                    services.readiness.fail(f"{where}{type(error).__name__}: {error}")
                    log.exception("backend failed to load", extra={"device": slot.device})
                    return
                seconds = round(time.perf_counter() - warming, 2)
                log.info("warmed up", extra={"device": slot.device, "warm_up_seconds": seconds})
                backends.append(backend)
            # Workers start only once every slot is warm, so no compilation runs beside a request.
            for index, backend in enumerate(backends):
                start_workers(LOCAL, backend, 1, first=index)
            services.readiness.ready(backends[0].name)
            log.info(
                "ready",
                extra={
                    "workers": len(backends),
                    "devices": plan.device,
                    "backend": backends[0].name,
                    "load_seconds": round(time.perf_counter() - started, 2),
                },
            )

        lanes = services.routing.lanes() if services.settings.workers > 0 else []
        for lane in lanes:
            if lane == LOCAL:
                services.lanes[LOCAL] = services.readiness
                threading.Thread(target=load_then_work, name="backend-loader", daemon=True).start()
                continue
            config = services.routing.upstreams[lane]
            upstream = build_upstream(config, services.settings.base_url)
            upstreams.append(upstream)
            start_workers(lane, upstream, config.workers)
            services.lanes[lane] = Readiness()
            services.lanes[lane].ready(lane)
            log.info(
                "upstream ready", extra={"backend": lane, "base_url": config.base_url, "key": str(config.key)}
            )
        if LOCAL not in lanes:
            services.readiness.ready(None)  # no local model to load: an API-only node, or all upstream
        # This process alone uses the store (its lock says so): a delivery still marked in flight was cut
        # short by the last process's end, and is due again now rather than when its deadline lapses.
        released = await asyncio.to_thread(services.store.release_webhooks, time.time())
        if released:
            log.warning("webhook tries cut short by the last stop will be retried", extra={"count": released})
        dispatcher = WebhookDispatcher(
            services.store,
            services.signer,
            services.fetcher,
            services.settings.webhook_backoff,
            send_timeout=services.settings.fetch_timeout,
            per_target=services.settings.webhook_concurrency,
        )
        tasks = [
            asyncio.create_task(dispatcher.run(stop_tasks)),
            asyncio.create_task(
                sweep_forever(
                    services.store,
                    services.storage,
                    services.settings.sweep_interval,
                    stop_tasks,
                    record_retention=services.settings.record_retention,
                )
            ),
        ]
        try:
            yield
        finally:
            stop_threads.set()
            services.wake_workers()
            stop_tasks.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            for thread in threads:
                # A request still running stops at its next step and goes back to the head of its queue,
                # counting nothing; one stuck past this (a fetch, a long step) is re-queued at the next start.
                await asyncio.to_thread(thread.join, 5.0)
            await services.fetcher.aclose()
            for upstream in upstreams:
                upstream.close()

    # /docs and /redoc from assets inside the fastapi-offline package: they work with no internet.
    app = FastAPIOffline(
        title="kontextd",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        redirect_slashes=False,
    )
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(build_queue_router(services))

    @app.get(
        "/health",
        tags=["server"],
        summary="Readiness: loading, ready or failed (with why)",
        responses={503: {"description": "Still loading the model, or failed to"}},
    )
    def health() -> JSONResponse:
        body = services.readiness.describe() | {
            "workers": len(services.workers),
            "backends": {lane: readiness.state for lane, readiness in services.lanes.items()},
        }
        return JSONResponse(body, status_code=200 if services.readiness.state == "ready" else 503)

    @app.get(
        "/v1/endpoints",
        tags=["server"],
        summary="Each endpoint: the backend and model serving it, and whether that backend is ready",
        dependencies=[Depends(services.authenticator.dependency())],
        responses=UNAUTHORIZED,
    )
    def endpoints() -> dict[str, list[dict[str, str | None]]]:
        listed = []
        for endpoint in ENDPOINTS:
            route = services.routing.route(endpoint.app_id)
            lane = services.lanes.get(route.backend)
            listed.append(
                {
                    "app_id": endpoint.app_id,
                    "title": endpoint.title,
                    "backend": route.backend,
                    "model": route.model,
                    "status": lane.state if lane else "stopped",  # stopped: no workers in this process
                    "reason": lane.reason if lane else None,
                }
            )
        return {"endpoints": listed}

    @app.get("/.well-known/jwks.json", tags=["server"], summary="Public keys that sign webhooks")
    def jwks() -> dict[str, object]:
        return services.signer.jwks()

    @app.get(
        "/files/{key:path}",
        tags=["server"],
        summary="A stored output image",
        response_class=StreamingResponse,
        responses={
            200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}}},
            404: {"description": "No such file: never stored, expired, or not a name this server makes"},
        },
    )
    def files(key: str) -> Response:
        stored = services.storage.open(key)
        if stored is None:
            return JSONResponse({"detail": "File not found"}, status_code=404)
        headers = {
            "Content-Length": str(stored.size),
            "Cache-Control": "private, max-age=31536000, immutable",
            "X-Content-Type-Options": "nosniff",
        }
        return StreamingResponse(_chunks(stored.stream), media_type=stored.content_type, headers=headers)

    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(TrailingSlash)
    app.add_middleware(TargetUrl, run_prefix=RUN_PREFIX)  # outermost: the trailing-slash rule applies after
    return app
