"""Prometheus metrics: every name prefixed `kontextd_`, in one registry of this process's own.

The rest of the code calls the small functions below (one line at each place something happens); the queue
and GPU memory are read when scraped (collectors). Each process counts what it did itself: with several
processes (API nodes, `kontextd worker`s) scrape each one; nothing is shared between them.

Labels are bounded, and never carry a key, an owner, a prompt or a URL: `endpoint` is a catalogue app id,
`lane` a backend of the routing, `outcome` one of a few words or a code-defined error type, `provider` an
upstream backend's name.
"""

import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from kontextd.jobs.model import Outcome, QueueDepth, Release, State

log = logging.getLogger("kontextd.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # every Prometheus reads it; no name needs escaping
REGISTRY = CollectorRegistry(auto_describe=True)
_ERROR_TYPE = re.compile(r"[a-z][a-z0-9_]{0,47}")  # error types are code constants; anything else is "error"

REQUESTS = Counter(
    "kontextd_requests",
    "Requests a worker of this process ended, by endpoint and outcome",
    ["endpoint", "outcome"],
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "kontextd_queue_wait_seconds",
    "Seconds from submit to a worker starting the request",
    ["endpoint"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
    registry=REGISTRY,
)
RUN_TIME = Histogram(
    "kontextd_run_seconds",
    "Seconds a worker spent on a request, from its start to its end being recorded",
    ["endpoint"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600),
    registry=REGISTRY,
)
STEP_TIME = Histogram(
    "kontextd_denoising_step_seconds",
    "Seconds each denoising step took, from the one before (steps/s: rate(_count) / rate(_sum))",
    ["lane"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
STEP_RATE = Gauge(
    "kontextd_denoising_steps_per_second",
    "Denoising steps per second of the latest request with two steps or more",
    ["lane"],
    registry=REGISTRY,
)
IMAGES = Counter("kontextd_images", "Images made and stored", ["endpoint"], registry=REGISTRY)
WEBHOOKS = Counter(
    "kontextd_webhook_attempts",
    "Webhook tries: delivered, retry (failed, tried again later) or failed (given up)",
    ["outcome"],
    registry=REGISTRY,
)
FETCH_REFUSALS = Counter(
    "kontextd_fetch_refusals",
    "URLs refused before any connection (a private address not allow-listed, a bad scheme or URL)",
    registry=REGISTRY,
)
UPSTREAM_ERRORS = Counter(
    "kontextd_upstream_errors",
    "Requests an upstream provider failed or refused, by error type",
    ["provider", "error_type"],
    registry=REGISTRY,
)
UPSTREAM_RETRIES = Counter(
    "kontextd_upstream_retries",
    "Calls to an upstream provider retried: rate_limited (HTTP 429) or error (5xx, transport)",
    ["provider", "reason"],
    registry=REGISTRY,
)


# -- what the rest of the code calls ---------------------------------------------------------------------


def outcome_label(outcome: Outcome) -> str:
    """ok, cancelled, timeout, or the error type (a bounded, code-defined set)."""
    if outcome.ok:
        return "ok"
    error_type = outcome.error_type or ""
    if error_type == "client_cancelled":
        return "cancelled"
    if error_type.endswith("timeout"):  # request_timeout, upstream_timeout
        return "timeout"
    return error_type if _ERROR_TYPE.fullmatch(error_type) else "error"


def request_ended(endpoint: str, ending: Outcome | Release, state: State | None, seconds: float) -> None:
    """A worker's run ended: its time always; the request counted when this run ended it (a request handed
    back runs again and is counted then; one taken over is its new worker's). A release that ended it is
    the last storage failure."""
    RUN_TIME.labels(endpoint).observe(seconds)
    if state is State.COMPLETED:
        outcome = "storage_error" if isinstance(ending, Release) else outcome_label(ending)
        REQUESTS.labels(endpoint, outcome).inc()


def generation_refused(lane: str, error_type: str) -> None:
    """A backend refused or failed a request: an upstream error when the lane is an upstream provider's."""
    if lane != "local":
        UPSTREAM_ERRORS.labels(lane, error_type if _ERROR_TYPE.fullmatch(error_type) else "error").inc()


def request_started(endpoint: str, created_at: float, started_at: float | None) -> None:
    if started_at is not None:
        QUEUE_WAIT.labels(endpoint).observe(max(0.0, started_at - created_at))


def images_made(endpoint: str, count: int) -> None:
    IMAGES.labels(endpoint).inc(count)


def webhook_attempt(delivered: bool, retrying: bool) -> None:
    WEBHOOKS.labels("delivered" if delivered else ("retry" if retrying else "failed")).inc()


def fetch_refused() -> None:
    FETCH_REFUSALS.inc()


def upstream_retry(provider: str, reason: str) -> None:
    UPSTREAM_RETRIES.labels(provider, reason).inc()


class StepTimer:
    """One request's denoising steps: each step's time from the one before (the first has none: what
    came before it is loading and encoding, not denoising)."""

    def __init__(self, lane: str) -> None:
        self._lane = lane
        self._last: float | None = None
        self._steps = 0
        self._seconds = 0.0

    def step(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            seconds = now - self._last
            STEP_TIME.labels(self._lane).observe(seconds)
            self._steps += 1
            self._seconds += seconds
            if self._seconds > 0:
                STEP_RATE.labels(self._lane).set(self._steps / self._seconds)
        self._last = now


# -- read when scraped -----------------------------------------------------------------------------------


class QueueCollector(Collector):
    """Queue depth and the oldest wait per lane, read from the job store at each scrape (in a thread: the
    exposition is made off the event loop). Lanes with nothing queued show 0. A store that cannot answer
    leaves both out of that scrape, rather than failing it."""

    def __init__(self, read: Callable[[], Mapping[str, QueueDepth]], lanes: Iterable[str]) -> None:
        self._read = read
        self._lanes = tuple(lanes)

    def collect(self) -> Iterator[Metric]:
        try:
            depths = self._read()
        except Exception as error:  # StoreUnavailable, or anything else: the rest of the scrape goes on
            log.warning("queue metrics skipped: the store cannot answer", extra={"reason": str(error)})
            return
        now = time.time()
        depth = GaugeMetricFamily("kontextd_queue_depth", "Requests queued, per lane", labels=["lane"])
        wait = GaugeMetricFamily(
            "kontextd_queue_oldest_wait_seconds",
            "Seconds the longest-queued request of each lane has waited (0: none queued)",
            labels=["lane"],
        )
        for lane in sorted(set(self._lanes) | set(depths)):
            found = depths.get(lane)
            depth.add_metric([lane], found.depth if found else 0)
            wait.add_metric([lane], max(0.0, now - found.oldest_created_at) if found else 0.0)
        yield depth
        yield wait


class GpuMemoryCollector(Collector):
    """CUDA memory per device, when this process uses CUDA (torch imported and CUDA initialised): never
    imports torch or starts a CUDA context itself. Absent on CPU."""

    def collect(self) -> Iterator[Metric]:
        torch = sys.modules.get("torch")
        try:
            if torch is None or not torch.cuda.is_initialized():
                return
            allocated = GaugeMetricFamily(
                "kontextd_gpu_memory_allocated_bytes", "GPU memory held by tensors", labels=["device"]
            )
            reserved = GaugeMetricFamily(
                "kontextd_gpu_memory_reserved_bytes", "GPU memory reserved by torch", labels=["device"]
            )
            for index in range(torch.cuda.device_count()):
                allocated.add_metric([f"cuda:{index}"], torch.cuda.memory_allocated(index))
                reserved.add_metric([f"cuda:{index}"], torch.cuda.memory_reserved(index))
        except Exception as error:  # a driver hiccup must not fail the scrape
            log.warning("GPU memory metrics skipped", extra={"reason": str(error)})
            return
        yield allocated
        yield reserved


REGISTRY.register(GpuMemoryCollector())


class _Forward(Collector):
    """The process registry's metrics inside a scrape's registry."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def scrape_registry(queue: QueueCollector | None) -> CollectorRegistry:
    """What one server exposes: the process's metrics, plus its store's queue."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Forward())
    if queue is not None:
        registry.register(queue)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The text format (version 0.0.4). Blocking (the queue read): call it off the event loop."""
    return generate_latest(registry)


def serve_on(port: int, registry: CollectorRegistry) -> threading.Thread:
    """`--metrics-port`: /metrics alone on 127.0.0.1 at `port`, without authentication (loopback only),
    on prometheus_client's own threaded HTTP server."""
    _, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    return thread
