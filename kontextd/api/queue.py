"""The fal queue API: submit, status, status stream, result and cancel — and the sync run route.

Writes always run off the event loop (they wait on fsync or the network). Reads run off it too, one
thread hop per response, on a store whose reads go over the network (PostgreSQL): a read on the loop
would stall every other client. On a store whose reads are local index seeks of microseconds (SQLite's
`quick_reads`) they run on the loop: there a thread hop costs more than the read, and on two cores the
hand-over of the interpreter lock between threads halved status-poll throughput (docs/performance.md).
Status polls and the status stream make one awaitable read instead (JobStore.poll): on the loop for
SQLite, over an async connection pool for PostgreSQL.
"""

import json
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from kontextd.api.deps import Owner, ServicesDep
from kontextd.api.json_body import JsonRoute
from kontextd.api.lean_route import LeanRoute
from kontextd.api.own_files import settle_own_files
from kontextd.api.responses import (
    CANCEL_RESPONSES,
    RESULT_RESPONSES,
    RUN_RESPONSES,
    RUN_STREAM_RESPONSES,
    STATUS_RESPONSES,
    STREAM_RESPONSES,
    SUBMIT_RESPONSES,
)
from kontextd.api.services import Services
from kontextd.api.wire import queue_prefix, request_urls, status_body
from kontextd.catalogue.endpoints import ENDPOINTS, RUNNER_HINT_PATTERN, Endpoint, affinity
from kontextd.catalogue.schemas import HTTP_URL_PATTERN, KontextOutput, QueueEnvelope, QueueStatus
from kontextd.fetch.guard import FetchError, GuardedFetcher
from kontextd.jobs.model import CancelResult, Job, JobSummary, NewJob, Priority, State
from kontextd.jobs.store import StoreUnavailable

T = TypeVar("T")

RUN_PREFIX = "/run"  # the run host is this server under /run; the queue host is the server root
POLL_FALLBACK_SECONDS = 1.0  # re-read state this often even without a wake-up (changes made elsewhere)
MAX_START_WAIT_SECONDS = 24 * 3600.0  # X-Fal-Request-Timeout: a deadline to start, at most a day away
MAX_OUTPUT_TTL_SECONDS = 365 * 24 * 3600.0  # X-Fal-Object-Lifecycle-Preference: outputs kept at most a year
MAX_WEBHOOK_URL_CHARS = 2048
WEBHOOK_URL_PATTERN = rf"^({HTTP_URL_PATTERN}|(?![\s\S]))"  # or empty ((?![\s\S]): the end, in both dialects)
_WEBHOOK_URL = re.compile(WEBHOOK_URL_PATTERN)
# The one JSON shape X-Fal-Object-Lifecycle-Preference is documented with (the parser takes any JSON object
# with the key): 1 to 9,999,999 seconds, all within the year allowed; or empty, meaning the default.
LIFECYCLE_PATTERN = r'^(\{ ?"expiration_duration_seconds": ?[1-9][0-9]{0,6}(\.[0-9]{1,3})? ?\})?(?![\s\S])'

LogsFlag = Annotated[
    Literal["1", "0", "true", "false"] | None,
    Query(description="Include the request's log lines: 1|0|true|false."),
]
PreviewsFlag = Annotated[
    Literal["1", "0", "true", "false"] | None,
    Query(
        description="Include live previews while it runs: `preview`, a small JPEG data URI of the image "
        "being made, every few steps of the local model (not a fal field: absent unless asked for)."
    ),
]


def _invalid(location: str, name: str, message: str, value: Any) -> RequestValidationError:
    return RequestValidationError(
        [{"type": "value_error", "loc": [location, name], "msg": message, "input": value}]
    )


def _lifecycle_ttl(header: str | None, default: float) -> float:
    if not header:  # absent, or sent empty by a client that templates its headers: the default
        return default
    name = "x-fal-object-lifecycle-preference"
    try:
        seconds = json.loads(header)["expiration_duration_seconds"]
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise TypeError(seconds)
    except (ValueError, TypeError, KeyError, RecursionError) as error:
        raise _invalid(
            "header", name, 'expected JSON like {"expiration_duration_seconds": 3600}', header
        ) from error
    # `not 0 < x <= max` also refuses NaN, which json.loads accepts and no comparison would catch; compared
    # first, so an integer too large for a float (isfinite would raise OverflowError) is refused too.
    if not (0 < seconds <= MAX_OUTPUT_TTL_SECONDS and math.isfinite(seconds)):
        raise _invalid(
            "header",
            name,
            f"expiration_duration_seconds must be above 0 and at most {MAX_OUTPUT_TTL_SECONDS:.0f} (a year)",
            header,
        )
    return float(seconds)


async def _webhook(url: str | None, fetcher: GuardedFetcher) -> str | None:
    """The webhook URL to keep, checked now: a target the guard refuses would only fail ten times later."""
    if not url:  # `?fal_webhook=` with nothing after it: no webhook
        return None
    if len(url) > MAX_WEBHOOK_URL_CHARS:
        raise _invalid("query", "fal_webhook", f"longer than {MAX_WEBHOOK_URL_CHARS} characters", url)
    if not _WEBHOOK_URL.match(url):
        raise _invalid("query", "fal_webhook", "must be an https:// or http:// URL", url)
    try:
        await fetcher.check(url)
    except FetchError as error:
        raise _invalid("query", "fal_webhook", error.message, url) from None
    return url


async def _read(services: Services, function: Callable[..., T], *args: Any) -> T:
    """Run a store read where it costs least: on the loop for quick local reads, else in a thread."""
    if services.store.quick_reads:
        return function(*args)
    return await run_in_threadpool(function, *args)


def _base_url(services: Services, request: Request) -> str:
    """Where this client reached us: our URLs in the response name the same origin (or --public-url)."""
    return services.urls.base(str(request.base_url))


def _outcome_response(services: Services, request: Request, job: Job) -> JSONResponse:
    assert job.outcome is not None
    headers = {"x-fal-request-id": job.request_id}
    if job.outcome.error_type:
        headers["X-Fal-Error-Type"] = job.outcome.error_type
    if job.outcome.served_by:  # which backend and model made it: [pro]/[max] may be served locally
        headers["x-kontextd-backend"] = job.lane
        headers["x-kontextd-model"] = job.outcome.served_by
    # Rendered now, for this client: results keep storage keys, never URLs (kontextd.storage.urls).
    rendered = services.urls.render(job.outcome.body, str(request.base_url))
    return JSONResponse(rendered, status_code=job.outcome.status_code, headers=headers)


def _new_job(
    services: Services,
    endpoint: Endpoint,
    body: dict[str, Any],
    owner: str,
    webhook: str | None,
    priority: str | None,
    timeout: float | None,
    lifecycle: str | None,
    no_retry: str | None,
    affinity: str | None,
) -> NewJob:
    return NewJob(
        request_id=str(uuid.uuid4()),
        gateway_request_id=str(uuid.uuid4()),
        app_id=endpoint.app_id,
        owner=owner,
        input=body,
        lane=services.routing.route(endpoint.app_id).backend,
        priority=Priority.LOW if priority == "low" else Priority.NORMAL,
        start_deadline=time.time() + timeout if timeout is not None else None,
        webhook_url=webhook,
        output_ttl_seconds=_lifecycle_ttl(lifecycle, services.settings.output_ttl),
        no_retry=no_retry in ("1", "true"),
        affinity=affinity,
    )


def _finished(services: Services, request_id: str, owner: str) -> Job | None:
    """The whole job once it has ended, else None: one thread hop per look."""
    summary = services.store.summary(request_id, owner)
    if summary is None or summary.state != State.COMPLETED:
        return None
    return services.store.get(request_id, owner)


async def _wait_until_completed(services: Services, request_id: str, owner: str) -> Job:
    feed = services.feed
    assert feed is not None
    while True:
        waiter = feed.watch(request_id)  # before reading: a change in between is not missed
        try:
            job = await _read(services, _finished, services, request_id, owner)
        except StoreUnavailable:  # the database restarting: the request is safe, keep waiting for it
            job = None
        if job is not None:
            waiter.cancel()
            return job
        await feed.wait(request_id, waiter, POLL_FALLBACK_SECONDS)


async def _status_events(
    services: Services,
    base: str,
    app_owner: str,
    app_alias: str,
    request_id: str,
    with_logs: bool,
    with_previews: bool = False,
) -> AsyncIterator[str]:
    """A request's status as server-sent events: `data: <status JSON>` each time it changes, until it has
    ended; `: ping` comments in between keep the connection alive."""
    ping_interval = services.settings.sse_ping_interval
    feed = services.feed
    assert feed is not None
    last_sent: dict[str, Any] | None = None
    last_write = time.monotonic()
    while True:
        # Woken by any process's change to this request (the store's notifications), else re-read on a
        # timeout: a lost wake-up delays an event, never drops it.
        waiter = feed.watch(request_id)
        try:
            found = await _status_of(services, base, app_owner, app_alias, request_id, None, with_logs)
        except StoreUnavailable:  # the database restarting: keep the stream alive, ask again shortly
            if time.monotonic() - last_write >= ping_interval:
                yield ": ping\n\n"
                last_write = time.monotonic()
            await feed.wait(request_id, waiter, POLL_FALLBACK_SECONDS)
            continue
        if found is None:
            waiter.cancel()
            return
        current, body = found
        if with_previews and current.state == State.IN_PROGRESS:
            preview = await _read(services, services.store.preview, request_id)
            if preview is not None:
                body = body | {"preview": preview}
        if body != last_sent:
            yield f"data: {json.dumps(body)}\n\n"
            last_sent, last_write = body, time.monotonic()
        if current.state == State.COMPLETED:
            waiter.cancel()
            return
        if time.monotonic() - last_write >= ping_interval:
            yield ": ping\n\n"
            last_write = time.monotonic()
        await feed.wait(request_id, waiter, min(POLL_FALLBACK_SECONDS, ping_interval))


def _event_stream(events: AsyncIterator[str], request_id: str) -> StreamingResponse:
    headers = {"x-fal-request-id": request_id, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


async def _run_events(services: Services, request: Request, job: NewJob) -> AsyncIterator[str]:
    """A streaming run's events: its status with logs as it changes, then its output as the last event
    (what fal_client.stream yields last and fal.stream's done() resolves with); a request that failed
    ends with its error body instead, as an `error` event."""
    app_owner, app_alias = queue_prefix(job.app_id).split("/")
    base = _base_url(services, request)
    async for event in _status_events(services, base, app_owner, app_alias, job.request_id, True):
        yield event
    finished = await _wait_until_completed(services, job.request_id, job.owner)
    assert finished.outcome is not None
    output = services.urls.render(finished.outcome.body, str(request.base_url))
    kind = "" if finished.outcome.ok else "event: error\n"
    yield f"{kind}data: {json.dumps(output)}\n\n"


SubmitMode = Literal["queue", "run", "stream"]  # answer with the envelope, the output, or events


def _submit_route(
    endpoint: Endpoint, mode: SubmitMode
) -> Callable[..., Awaitable[JSONResponse | StreamingResponse]]:
    """The submit (queue), sync run or streaming run handler of one endpoint: its signature names the
    endpoint's input model."""
    input_model: type[BaseModel] = endpoint.input_model

    async def submit(
        request: Request,
        body: input_model,  # type: ignore[valid-type]
        services: ServicesDep,
        owner: Owner,
        fal_webhook: Annotated[
            str | None,
            Query(
                description="URL to POST the result to when it ends; refused at once if the server "
                "may not reach it. Empty: no webhook.",
                json_schema_extra={"pattern": WEBHOOK_URL_PATTERN},
            ),
        ] = None,
        x_fal_queue_priority: Annotated[
            Literal["normal", "low"] | None, Header(description="normal runs before low.")
        ] = None,
        x_fal_request_timeout: Annotated[
            float | None,
            Header(
                gt=0,
                le=MAX_START_WAIT_SECONDS,
                allow_inf_nan=False,
                description="Seconds the request may wait to start (at most a day).",
            ),
        ] = None,
        x_fal_object_lifecycle_preference: Annotated[
            str | None,
            Header(
                description='How long outputs are kept: {"expiration_duration_seconds": N}, N seconds '
                "above 0 and at most a year. Empty: the server's default.",
                json_schema_extra={"pattern": LIFECYCLE_PATTERN},
            ),
        ] = None,
        x_fal_no_retry: Annotated[
            Literal["1", "0", "true", "false"] | None,
            Header(description="1 (or true): do not re-run the request if its worker stops; 0: do."),
        ] = None,
        x_fal_runner_hint: Annotated[
            str | None,
            Header(
                pattern=RUNNER_HINT_PATTERN,
                description="An affinity key (up to 256 visible ASCII characters): requests with the "
                "same hint go, where it costs no one a long wait, to the worker that ran the last ones. "
                "Empty: none.",
            ),
        ] = None,
    ) -> JSONResponse | StreamingResponse:
        job = _new_job(
            services,
            endpoint,
            # Our own files in it (uploads, outputs): checked for this key, named as the workers know them.
            await settle_own_files(services, body.model_dump(mode="json"), owner, str(request.base_url)),
            owner,
            await _webhook(fal_webhook, services.fetcher),
            x_fal_queue_priority,
            x_fal_request_timeout,
            x_fal_object_lifecycle_preference,
            x_fal_no_retry,
            affinity(body, x_fal_runner_hint),
        )
        position = await run_in_threadpool(services.store.submit, job)
        services.wake_workers(job.lane)  # this process's; other processes hear of it through the store
        if mode == "run":
            finished = await _wait_until_completed(services, job.request_id, owner)
            return _outcome_response(services, request, finished)
        if mode == "stream":
            return _event_stream(_run_events(services, request, job), job.request_id)
        envelope = {
            "status": "IN_QUEUE",
            "request_id": job.request_id,
            "gateway_request_id": job.gateway_request_id,
            **request_urls(_base_url(services, request), job.app_id, job.request_id),
            "queue_position": position,
            "logs": None,
            "metrics": {},
        }
        return JSONResponse(envelope, headers={"x-fal-request-id": job.request_id})

    return submit


router = APIRouter(route_class=JsonRoute)

for _endpoint in ENDPOINTS:
    router.add_api_route(
        f"/{_endpoint.app_id}",
        _submit_route(_endpoint, "queue"),
        methods=["POST"],
        tags=[_endpoint.app_id],
        summary=_endpoint.title,
        description=_endpoint.description + " Queues the request; follow it with the returned URLs.",
        response_model=QueueEnvelope,
        responses=SUBMIT_RESPONSES,
        operation_id=f"submit_{_endpoint.app_id}",
    )
    router.add_api_route(
        f"{RUN_PREFIX}/{_endpoint.app_id}",
        _submit_route(_endpoint, "run"),
        methods=["POST"],
        tags=["run (sync)"],
        summary=f"{_endpoint.title}: wait for the result",
        description=_endpoint.description,
        response_model=KontextOutput,
        responses=RUN_RESPONSES,
        operation_id=f"run_{_endpoint.app_id}",
    )
    router.add_api_route(
        f"{RUN_PREFIX}/{_endpoint.app_id}/stream",
        _submit_route(_endpoint, "stream"),
        methods=["POST"],
        tags=["run (streaming)"],
        summary=f"{_endpoint.title}: stream progress, then the result",
        description=_endpoint.description
        + " Server-sent events: the status with logs each time it changes, then the output as the last"
        " event (a failed request's error body instead, as an `error` event).",
        response_class=StreamingResponse,
        response_model=None,
        responses=RUN_STREAM_RESPONSES,
        operation_id=f"stream_{_endpoint.app_id}",
    )


def _find(
    services: Services, app_owner: str, app_alias: str, request_id: str, owner: str | None
) -> JobSummary | None:
    job = services.store.summary(request_id, owner)
    if job is None or queue_prefix(job.app_id) != f"{app_owner}/{app_alias}":
        return None  # someone else's request looks exactly like an unknown one
    return job


async def _status_of(
    services: Services,
    base_url: str,
    app_owner: str,
    app_alias: str,
    request_id: str,
    owner: str | None,
    with_logs: bool,
) -> tuple[JobSummary, dict[str, Any]] | None:
    """A request's status body: summary, queue position and logs, in the store's one awaitable read."""
    polled = await services.store.poll(request_id, owner, with_logs)
    if polled is None or queue_prefix(polled.summary.app_id) != f"{app_owner}/{app_alias}":
        return None  # someone else's request looks exactly like an unknown one
    return polled.summary, status_body(polled.summary, base_url, polled.queue_position, polled.logs)


REQUESTS_PATH = "/{app_owner}/{app_alias}/requests/{request_id}"
NOT_FOUND = {"detail": "Request not found"}

# What clients poll (status, its stream, result) and cancel: lean routes, matched before the submit routes.
polls = APIRouter(route_class=LeanRoute)


@polls.get(
    REQUESTS_PATH + "/status",
    tags=["queue"],
    summary="Request status",
    response_model=QueueStatus,
    responses=STATUS_RESPONSES,
)
async def status(
    request: Request,
    app_owner: str,
    app_alias: str,
    request_id: str,
    services: ServicesDep,
    owner: Owner,
    logs: LogsFlag = None,
) -> JSONResponse:
    base = _base_url(services, request)
    found = await _status_of(services, base, app_owner, app_alias, request_id, owner, logs in ("1", "true"))
    if found is None:
        return JSONResponse(NOT_FOUND, status_code=404)
    job, body = found
    code = 200 if job.state == State.COMPLETED else 202
    return JSONResponse(body, status_code=code, headers={"x-fal-request-id": job.request_id})


@polls.get(
    REQUESTS_PATH + "/status/stream",
    tags=["queue"],
    summary="Request status as server-sent events",
    response_class=StreamingResponse,
    response_model=None,
    responses=STREAM_RESPONSES,
)
async def stream(
    request: Request,
    app_owner: str,
    app_alias: str,
    request_id: str,
    services: ServicesDep,
    owner: Owner,
    logs: LogsFlag = None,
    previews: PreviewsFlag = None,
) -> StreamingResponse | JSONResponse:
    if await _read(services, _find, services, app_owner, app_alias, request_id, owner) is None:
        return JSONResponse(NOT_FOUND, status_code=404)
    base = _base_url(services, request)
    wanted = logs in ("1", "true"), previews in ("1", "true")
    events = _status_events(services, base, app_owner, app_alias, request_id, *wanted)
    return _event_stream(events, request_id)


def _result_of(
    services: Services, app_owner: str, app_alias: str, request_id: str, owner: str
) -> JobSummary | Job | None:
    """The finished job, or its summary when it has not ended or its outputs expired; None: not found."""
    job = _find(services, app_owner, app_alias, request_id, owner)
    if job is None or job.state != State.COMPLETED or job.output_expired:
        return job
    return services.store.get(request_id, owner)


@polls.get(
    REQUESTS_PATH,
    tags=["queue"],
    summary="Request result",
    response_model=KontextOutput,
    responses=RESULT_RESPONSES,
)
async def result(
    request: Request, request_id: str, app_owner: str, app_alias: str, services: ServicesDep, owner: Owner
) -> JSONResponse:
    job = await _read(services, _result_of, services, app_owner, app_alias, request_id, owner)
    if job is None:
        return JSONResponse(NOT_FOUND, status_code=404)
    if isinstance(job, Job):
        return _outcome_response(services, request, job)
    headers = {"x-fal-request-id": request_id}
    if job.state != State.COMPLETED:
        return JSONResponse({"detail": "Request is still in progress"}, status_code=400, headers=headers)
    return JSONResponse({"detail": "The request's outputs have expired"}, status_code=410, headers=headers)


def _cancel(services: Services, app_owner: str, app_alias: str, request_id: str, owner: str) -> CancelResult:
    if _find(services, app_owner, app_alias, request_id, owner) is None:
        return CancelResult.NOT_FOUND
    return services.store.cancel(request_id, owner, time.time())


@polls.put(
    REQUESTS_PATH + "/cancel",
    tags=["queue"],
    summary="Cancel a request",
    status_code=202,
    responses=CANCEL_RESPONSES,
)
async def cancel(
    request_id: str, app_owner: str, app_alias: str, services: ServicesDep, owner: Owner
) -> JSONResponse:
    outcome = await run_in_threadpool(_cancel, services, app_owner, app_alias, request_id, owner)
    if outcome is CancelResult.NOT_FOUND:
        return JSONResponse({"status": "NOT_FOUND"}, status_code=404)
    services.notify(request_id)  # a worker on another node hears of it through the store
    if outcome is CancelResult.ALREADY_COMPLETED:
        return JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400)
    return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)
