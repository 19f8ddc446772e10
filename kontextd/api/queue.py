"""The fal queue API: submit, status, status stream, result and cancel — and the sync run route."""

import json
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from kontextd.api.json_body import JsonRoute
from kontextd.api.responses import (
    CANCEL_RESPONSES,
    RESULT_RESPONSES,
    RUN_RESPONSES,
    STATUS_RESPONSES,
    STREAM_RESPONSES,
    SUBMIT_RESPONSES,
)
from kontextd.api.services import Services
from kontextd.api.wire import queue_prefix, request_urls, status_body
from kontextd.catalogue.endpoints import ENDPOINTS, Endpoint
from kontextd.catalogue.schemas import HTTP_URL_PATTERN, KontextOutput, QueueEnvelope, QueueStatus
from kontextd.fetch.guard import FetchError, GuardedFetcher
from kontextd.jobs.model import CancelResult, Job, JobSummary, NewJob, Priority, State

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
    # `not 0 < x <= max` also refuses NaN, which json.loads accepts and no comparison would catch.
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_OUTPUT_TTL_SECONDS):
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


def _outcome_response(job: Job) -> JSONResponse:
    assert job.outcome is not None
    headers = {"x-fal-request-id": job.request_id}
    if job.outcome.error_type:
        headers["X-Fal-Error-Type"] = job.outcome.error_type
    if job.outcome.served_by:  # which backend and model made it: [pro]/[max] may be served locally
        headers["x-kontextd-backend"] = job.lane
        headers["x-kontextd-model"] = job.outcome.served_by
    return JSONResponse(job.outcome.body, status_code=job.outcome.status_code, headers=headers)


def build_queue_router(services: Services) -> APIRouter:
    router = APIRouter(route_class=JsonRoute)
    store = services.store
    settings = services.settings
    Owner = Annotated[str, Depends(services.authenticator.dependency())]

    def base_url(request: Request) -> str:
        return settings.public_url or str(request.base_url)

    def new_job(
        endpoint: Endpoint,
        body: BaseModel,
        owner: str,
        webhook: str | None,
        priority: str | None,
        timeout: float | None,
        lifecycle: str | None,
        no_retry: str | None,
    ) -> NewJob:
        return NewJob(
            request_id=str(uuid.uuid4()),
            gateway_request_id=str(uuid.uuid4()),
            app_id=endpoint.app_id,
            owner=owner,
            input=body.model_dump(mode="json"),
            lane=services.routing.route(endpoint.app_id).backend,
            priority=Priority.LOW if priority == "low" else Priority.NORMAL,
            start_deadline=time.time() + timeout if timeout is not None else None,
            webhook_url=webhook,
            output_ttl_seconds=_lifecycle_ttl(lifecycle, settings.output_ttl),
            no_retry=no_retry in ("1", "true"),
        )

    async def enqueue(job: NewJob) -> int:
        position = await run_in_threadpool(store.submit, job)
        services.wake_workers()
        return position

    async def wait_until_completed(request_id: str, owner: str) -> Job:
        assert services.feed is not None
        while True:
            waiter = services.feed.watch(request_id)
            summary = store.summary(request_id, owner)
            if summary is not None and summary.state == State.COMPLETED:
                waiter.cancel()
                job = store.get(request_id, owner)
                assert job is not None
                return job
            await services.feed.wait(request_id, waiter, POLL_FALLBACK_SECONDS)

    def add_submit(endpoint: Endpoint, run_mode: bool) -> None:
        input_model: type[BaseModel] = endpoint.input_model

        async def submit(
            request: Request,
            body: input_model,  # type: ignore[valid-type]
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
        ) -> JSONResponse:
            job = new_job(
                endpoint,
                body,
                owner,
                await _webhook(fal_webhook, services.fetcher),
                x_fal_queue_priority,
                x_fal_request_timeout,
                x_fal_object_lifecycle_preference,
                x_fal_no_retry,
            )
            position = await enqueue(job)
            if run_mode:
                return _outcome_response(await wait_until_completed(job.request_id, owner))
            envelope = {
                "status": "IN_QUEUE",
                "request_id": job.request_id,
                "gateway_request_id": job.gateway_request_id,
                **request_urls(base_url(request), job.app_id, job.request_id),
                "queue_position": position,
                "logs": None,
                "metrics": {},
            }
            return JSONResponse(envelope, headers={"x-fal-request-id": job.request_id})

        if run_mode:
            router.add_api_route(
                f"{RUN_PREFIX}/{endpoint.app_id}",
                submit,
                methods=["POST"],
                tags=["run (sync)"],
                summary=f"{endpoint.title}: wait for the result",
                description=endpoint.description,
                response_model=KontextOutput,
                responses=RUN_RESPONSES,
                operation_id=f"run_{endpoint.app_id}",
            )
        else:
            router.add_api_route(
                f"/{endpoint.app_id}",
                submit,
                methods=["POST"],
                tags=[endpoint.app_id],
                summary=endpoint.title,
                description=endpoint.description + " Queues the request; follow it with the returned URLs.",
                response_model=QueueEnvelope,
                responses=SUBMIT_RESPONSES,
                operation_id=f"submit_{endpoint.app_id}",
            )

    for endpoint in ENDPOINTS:
        add_submit(endpoint, run_mode=False)
        add_submit(endpoint, run_mode=True)

    def find(app_owner: str, app_alias: str, request_id: str, owner: str) -> JobSummary | None:
        job = store.summary(request_id, owner)
        if job is None or queue_prefix(job.app_id) != f"{app_owner}/{app_alias}":
            return None  # someone else's request looks exactly like an unknown one
        return job

    def current_status(request: Request, job: JobSummary, with_logs: bool) -> dict[str, Any]:
        position = store.queue_position(job.request_id) if job.state == State.IN_QUEUE else None
        logs = store.logs(job.request_id) if with_logs else None
        return status_body(job, base_url(request), position, logs)

    # Reads are SQLite point lookups of microseconds: they run on the event loop, since a threadpool hop
    # costs more than the lookup itself. Writes (submit, cancel) wait on fsync and go to the threadpool.
    requests_path = "/{app_owner}/{app_alias}/requests/{request_id}"
    not_found = {"detail": "Request not found"}

    @router.get(
        requests_path + "/status",
        tags=["queue"],
        summary="Request status",
        response_model=QueueStatus,
        responses=STATUS_RESPONSES,
    )
    async def status(
        request: Request, app_owner: str, app_alias: str, request_id: str, owner: Owner, logs: LogsFlag = None
    ) -> JSONResponse:
        job = find(app_owner, app_alias, request_id, owner)
        if job is None:
            return JSONResponse(not_found, status_code=404)
        body = current_status(request, job, logs in ("1", "true"))
        code = 200 if job.state == State.COMPLETED else 202
        return JSONResponse(body, status_code=code, headers={"x-fal-request-id": job.request_id})

    @router.get(
        requests_path + "/status/stream",
        tags=["queue"],
        summary="Request status as server-sent events",
        response_class=StreamingResponse,
        response_model=None,
        responses=STREAM_RESPONSES,
    )
    async def stream(
        request: Request, app_owner: str, app_alias: str, request_id: str, owner: Owner, logs: LogsFlag = None
    ) -> StreamingResponse | JSONResponse:
        job = find(app_owner, app_alias, request_id, owner)
        if job is None:
            return JSONResponse(not_found, status_code=404)
        with_logs = logs in ("1", "true")

        async def events() -> AsyncIterator[str]:
            assert services.feed is not None
            last_sent: dict[str, Any] | None = None
            last_write = time.monotonic()
            while True:
                waiter = services.feed.watch(request_id)
                current = store.summary(request_id)
                if current is None:
                    waiter.cancel()
                    return
                body = current_status(request, current, with_logs)
                if body != last_sent:
                    yield f"data: {json.dumps(body)}\n\n"
                    last_sent, last_write = body, time.monotonic()
                if current.state == State.COMPLETED:
                    waiter.cancel()
                    return
                if time.monotonic() - last_write >= settings.sse_ping_interval:
                    yield ": ping\n\n"
                    last_write = time.monotonic()
                wait = min(POLL_FALLBACK_SECONDS, settings.sse_ping_interval)
                await services.feed.wait(request_id, waiter, wait)

        headers = {"x-fal-request-id": request_id, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @router.get(
        requests_path,
        tags=["queue"],
        summary="Request result",
        response_model=KontextOutput,
        responses=RESULT_RESPONSES,
    )
    async def result(request_id: str, app_owner: str, app_alias: str, owner: Owner) -> JSONResponse:
        job = find(app_owner, app_alias, request_id, owner)
        if job is None:
            return JSONResponse(not_found, status_code=404)
        if job.state != State.COMPLETED:
            return JSONResponse(
                {"detail": "Request is still in progress"},
                status_code=400,
                headers={"x-fal-request-id": request_id},
            )
        if job.output_expired:
            return JSONResponse(
                {"detail": "The request's outputs have expired"},
                status_code=410,
                headers={"x-fal-request-id": request_id},
            )
        finished = store.get(request_id, owner)
        assert finished is not None
        return _outcome_response(finished)

    @router.put(
        requests_path + "/cancel",
        tags=["queue"],
        summary="Cancel a request",
        status_code=202,
        responses=CANCEL_RESPONSES,
    )
    async def cancel(request_id: str, app_owner: str, app_alias: str, owner: Owner) -> JSONResponse:
        if find(app_owner, app_alias, request_id, owner) is None:
            return JSONResponse({"status": "NOT_FOUND"}, status_code=404)
        outcome = await run_in_threadpool(store.cancel, request_id, owner, time.time())
        services.notify(request_id)
        if outcome is CancelResult.NOT_FOUND:
            return JSONResponse({"status": "NOT_FOUND"}, status_code=404)
        if outcome is CancelResult.ALREADY_COMPLETED:
            return JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400)
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)

    return router
