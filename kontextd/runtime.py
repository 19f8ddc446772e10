"""The process: everything that runs beside (or without) the HTTP API.

`kontextd serve` runs this under its HTTP server, `kontextd worker` on its own; both run the same parts:

* one queue lane per backend in use: the local model's pipelines, loaded and warmed off the event loop
  (requests queue meanwhile, /health says loading), and each upstream API's workers;
* the webhook dispatcher (each delivery is taken by one node, through the store);
* the sweeper (once per period across the deployment, through the store's turn);
* wake-ups: workers started at once on a submit (in this process, or through the store's notifications
  from any other), and waiters on a request (status streams, sync runs) woken when it changes.

Start-up recovery follows the store: a store only this process uses re-queues what the last process left
running; a shared one leaves running jobs to their leases, since other nodes may be running them.
"""

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from PIL import Image

from kontextd.api.changes import ChangeFeed
from kontextd.api.services import Readiness, Services
from kontextd.backends import BackendUnavailable, load_backend
from kontextd.backends.base import Backend
from kontextd.backends.lora_files import LoraFiles
from kontextd.backends.upstream import UpstreamBackend, build_upstream
from kontextd.config import LORA_FETCH_SECONDS
from kontextd.fetch.addresses import AllowList
from kontextd.fetch.guard import FetchError, FetchLimits, GuardedFetcher
from kontextd.fetch.images import decode_image, load_image
from kontextd.jobs.model import Release
from kontextd.jobs.store import StoreUnavailable
from kontextd.routing import LOCAL
from kontextd.safety.checker import SafetyChecker, SafetyCheckerUnavailable, load_safety_checker
from kontextd.webhooks.delivery import WebhookDispatcher
from kontextd.worker.housekeeping import sweep_forever
from kontextd.worker.runner import Worker

log = logging.getLogger("kontextd.runtime")

IMAGE_LOAD_TIMEOUT = 120.0  # upper bound on the guard's own limits, so a worker can never hang on a fetch
THREAD_JOIN_SECONDS = 5.0


def recover_at_start(services: Services) -> None:
    """Before serving: hand back what a dead process left behind (a store only it used), then move queued
    requests to the lane their endpoint is routed to now."""
    store = services.store
    now = time.time()
    if not store.shared:
        # Not counted against them: the process stopped, not the requests (up to a limit of such stops).
        requeued = store.recover_after_restart(now)
        if requeued:
            log.warning("re-queued requests the last process stopped under", extra={"count": requeued})
        # A delivery still marked in flight was cut short by the last process's end: due again now.
        released = store.release_webhooks(now)
        if released:
            log.warning("webhook tries cut short by the last stop will be retried", extra={"count": released})
    # After the re-queue: a request interrupted on a backend no longer routed to must move as well.
    moved = store.move_to_lanes({route.app_id: route.backend for route in services.routing.routes.values()})
    if moved:
        log.warning(
            "moved queued requests to the backend their endpoint is now routed to", extra={"count": moved}
        )


class Runtime:
    def __init__(self, services: Services) -> None:
        self.services = services
        self._stop_threads = threading.Event()
        self._threads: list[threading.Thread] = []
        self._upstreams: list[UpstreamBackend] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: list[Callable[[], Awaitable[None]]] = []  # clients of parts started later

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Start every part, yield while the process serves, then stop them: running requests stop at
        their next step and go back to the head of their queue, counting nothing."""
        async with self.services.store.serving(), self._parts():
            yield

    @contextlib.asynccontextmanager
    async def _parts(self) -> AsyncIterator[None]:
        services = self.services
        self._loop = asyncio.get_running_loop()
        services.feed = ChangeFeed(self._loop)
        stop_listening = services.store.listen(services.feed.notify, self._wake_lane)
        self._start_lanes()
        stop_tasks = asyncio.Event()
        tasks = [
            asyncio.create_task(self._dispatcher().run(stop_tasks)),
            asyncio.create_task(
                sweep_forever(
                    services.store,
                    services.storage,
                    services.settings.sweep_interval,
                    stop_tasks,
                    record_retention=services.settings.record_retention,
                    lease_seconds=services.settings.lease_seconds,
                )
            ),
        ]
        try:
            yield
        finally:
            self._stop_threads.set()
            services.wake_workers()
            stop_tasks.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            for thread in self._threads:
                await asyncio.to_thread(thread.join, THREAD_JOIN_SECONDS)
            await asyncio.to_thread(self._hand_back_stuck)
            stop_listening()
            await services.fetcher.aclose()
            for close in self._closing:
                await close()
            for upstream in self._upstreams:
                upstream.close()

    def _hand_back_stuck(self) -> None:
        """A request still running after the join (a long fetch or step) is handed back for this graceful
        stop, counting nothing, rather than left to its lease, which would count it as its own failure.
        Its worker's own end record is refused afterwards: the job is no longer its."""
        for worker in self.services.workers:
            request_id = worker.current
            if request_id is None:
                continue
            try:
                self.services.store.release(request_id, worker.worker_id, Release.SHUTDOWN, time.time())
            except StoreUnavailable as error:  # its lease or the next start recovers it instead
                log.warning(
                    "could not hand back a request", extra={"request_id": request_id, "reason": str(error)}
                )

    # -- lanes and workers -----------------------------------------------------------------------

    def _wake_lane(self, lane: str) -> None:
        """Work was queued in `lane` by some process: wake this process's idle workers of that lane."""
        self.services.wake_workers(lane)

    def _start_lanes(self) -> None:
        services = self.services
        lanes = services.routing.lanes() if services.settings.workers > 0 else []
        for lane in lanes:
            if lane == LOCAL:
                services.lanes[LOCAL] = services.readiness
                threading.Thread(target=self._load_then_work, name="backend-loader", daemon=True).start()
                continue
            config = services.routing.upstreams[lane]
            upstream = build_upstream(config, services.settings.base_url)
            self._upstreams.append(upstream)
            self._start_workers(lane, upstream, config.workers)
            services.lanes[lane] = Readiness()
            services.lanes[lane].ready(lane)
            log.info(
                "upstream ready", extra={"backend": lane, "base_url": config.base_url, "key": str(config.key)}
            )
        if LOCAL not in lanes:
            services.readiness.ready(None)  # no local model to load: an API-only node, or all upstream

    def _start_workers(
        self,
        lane: str,
        backend: Backend,
        count: int,
        first: int = 0,
        safety: SafetyChecker | None = None,
    ) -> None:
        services = self.services
        for index in range(first, first + count):
            worker = Worker(
                worker_id=f"{services.instance_id}-{lane}-{index}",
                store=services.store,
                backend=backend,
                lane=lane,
                models=lambda app_id: services.routing.route(app_id).model,
                storage=services.storage,
                load_image=self._image_loader(),
                notify=services.notify,
                lease_seconds=services.settings.lease_seconds,
                safety=safety,
            )
            services.workers.append(worker)
            thread = threading.Thread(
                target=worker.run_forever, args=(self._stop_threads,), name=f"{lane}-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _load_then_work(self) -> None:
        """Load and warm up one pipeline per device slot off the event loop, then start one worker on
        each; meanwhile requests queue and /health says loading."""
        services = self.services
        started = time.perf_counter()
        plan = services.plan
        try:  # first, and on the CPU: the local lane never serves an image it could not check
            safety = load_safety_checker(services.safety)
        except SafetyCheckerUnavailable as error:
            services.readiness.fail(str(error))
            log.error("safety checker unavailable", extra={"reason": str(error)})
            return
        backends = []
        loras = self._lora_files()  # one cache for every slot: a LoRA is fetched once per process
        for slot in plan.slots:
            where = f"{slot.device}: " if len(plan.slots) > 1 else ""  # which of several failed
            try:
                backend = load_backend(
                    plan, slot, tiny_step_seconds=services.settings.tiny_step_seconds, lora_files=loras
                )
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
            self._start_workers(LOCAL, backend, 1, first=index, safety=safety)
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

    def _lora_files(self) -> LoraFiles:
        """Where LoRA files come from: URLs through the fetch guard (the same allow-list as images, the
        LoRA size cap and a longer timeout), cached in the data directory."""
        settings = self.services.settings
        loop = self._loop
        assert loop is not None
        fetcher = GuardedFetcher(
            AllowList.parse(settings.fetch_allow),
            FetchLimits(max_bytes=settings.lora_max_bytes, timeout_seconds=LORA_FETCH_SECONDS),
        )
        self._closing.append(fetcher.aclose)

        def fetch(url: str) -> bytes:
            return asyncio.run_coroutine_threadsafe(fetcher.get(url), loop).result(LORA_FETCH_SECONDS * 2)

        return LoraFiles(
            settings.data_dir / "loras",
            fetch=fetch,
            lora_dir=settings.lora_dir,
            cache_bytes=settings.lora_cache_bytes,
        )

    def _image_loader(self) -> Callable[[str], Image.Image]:
        services = self.services
        loop = self._loop
        assert loop is not None

        def fetch_image(url: str) -> Image.Image:
            key = services.urls.key_of(url, services.settings.base_url)
            if key is not None:  # one of our outputs, edited again: read from storage, never fetched
                return _stored_image(services, key)
            # Workers are threads; the guard's HTTP client lives on the event loop.
            return asyncio.run_coroutine_threadsafe(load_image(url, services.fetcher), loop).result(
                IMAGE_LOAD_TIMEOUT
            )

        return fetch_image

    def _dispatcher(self) -> WebhookDispatcher:
        services = self.services
        settings = services.settings
        return WebhookDispatcher(
            services.store,
            services.signer,
            services.fetcher,
            settings.webhook_backoff,
            send_timeout=settings.fetch_timeout,
            per_target=settings.webhook_concurrency,
            render=lambda body: services.urls.render(body, settings.base_url),
        )


def _stored_image(services: Services, key: str) -> Image.Image:
    if not key:  # a URL of ours whose path is not a name we make: says nothing about which files exist
        raise FetchError("file_download_error", "That URL is not a file this server stored")
    stored = services.storage.open(key)
    if stored is None:
        raise FetchError("file_download_error", "That output of this server no longer exists (expired?)")
    with stored.stream:
        return decode_image(stored.stream.read())
