"""The fal upstream: forward each request to fal's hosted queue (queue.fal.run) and re-host what it made.

One request here is one request there: submit the input rebuilt for the target app, poll its status
(relaying the queue position and fal's log lines into our request's logs), then fetch the result and
download every image at once: fal's output URLs are not ours to hand out and may expire, so the worker
stores the files itself. The key travels only in the Authorization header of calls to fal's queue URLs,
never to the output file hosts, and never into a log line or a message.

The fal request's id and URLs are kept with our request (Progress.checkpoint) once fal accepts it: a re-run
of our request (its worker crashed or was stopped) follows that fal request instead of submitting, and
paying for, another; only one fal no longer knows is submitted anew. For the same reason a request handed
back at a shutdown is not cancelled at fal.
"""

import json
import logging
import time
from typing import Any

import httpx

from kontextd import metrics
from kontextd.backends.base import (
    EncodedImage,
    Generated,
    GenerationCancelled,
    GenerationJob,
    GenerationRefused,
    ImageInput,
    Progress,
)
from kontextd.backends.upstream.common import (
    ConcurrencyLimits,
    ProgressView,
    RetryingClient,
    RetryPolicy,
    base64_png,
    download_output,
    image_reference,
    pause,
    time_left,
)
from kontextd.catalogue.endpoints import BY_APP_ID
from kontextd.catalogue.resolutions import output_size
from kontextd.routing import UpstreamConfig

log = logging.getLogger("kontextd.upstream.fal")

POLL_FIRST = 0.25  # seconds before the first status poll (fal's own clients poll about this often)
POLL_FACTOR = 1.5
POLL_MAX = 2.0  # a Kontext image takes seconds: a finished one never waits longer than this for us
RETRY_BASE = 1.0  # backoff base (seconds) for retries: 5xx, transport errors, 429 without Retry-After
RETRY_CAP = 30.0  # the longest backoff (seconds)
RETRY_AFTER_MAX = 60.0  # a longer Retry-After is waited in several goes, each re-checking the deadline
MAX_RETRIES = 4  # failed exchanges (5xx, transport) in a row before giving up on fal
CANCEL_TIMEOUT = 5.0  # the best-effort cancel must not hold the worker up
MAX_MESSAGE = 500  # characters of fal's error text passed on to our client

ENVELOPE_URLS = ("status_url", "response_url", "cancel_url")
CHECKPOINT = "fal request"  # the name its id and URLs are kept under, for a re-run

# Sent to a fal app outside our catalogue (a route naming another app): the fields of the [pro]/[max] apps
# (single and multi-image).
# fal's apps ignore fields they do not know, so the worst case is a default where a value was meant.
COMMON_FIELDS = frozenset(
    {
        "prompt",
        "image_url",
        "image_urls",
        "aspect_ratio",
        "num_images",
        "seed",
        "guidance_scale",
        "output_format",
        "safety_tolerance",
        "enhance_prompt",
        "sync_mode",
    }
)


class FalBackend:
    """Serves requests on fal's hosted queue with the operator's key; `job.model` is the fal app id."""

    name = "fal"

    def __init__(
        self,
        config: UpstreamConfig,
        own_base_url: str,
        *,
        poll_first: float = POLL_FIRST,
        poll_max: float = POLL_MAX,
        retry_base: float = RETRY_BASE,
        max_retries: int = MAX_RETRIES,
    ) -> None:
        self._config = config
        self._own_base_url = own_base_url
        self._base_url = config.base_url.rstrip("/")
        self._poll_first = poll_first
        self._poll_max = poll_max
        self._limits = ConcurrencyLimits(config.max_active, config.max_active_per_model)
        # One client for every worker thread of the lane (httpx.Client is thread-safe); no default
        # headers, so the key is never sent to the hosts serving output files.
        self._http = RetryingClient(
            httpx.Client(timeout=config.request_timeout, follow_redirects=False),
            RetryPolicy(max_retries, retry_base, RETRY_CAP, retry_after_max=RETRY_AFTER_MAX),
            config.request_timeout,
        )

    def close(self) -> None:
        self._http.close()

    def generate(self, job: GenerationJob, progress: Progress) -> Generated:
        if not job.model:
            raise ValueError("the fal backend needs the fal app id in job.model")
        started = time.monotonic()
        deadline = started + self._config.task_timeout
        if progress.cancelled():
            raise GenerationCancelled
        body = fal_input(job, self._own_base_url)  # may fetch the input image: before a slot
        try:
            with self._limits.slot(job.model, _UntilDeadline(progress, deadline)):
                images, flags = self._run(job.model, body, progress, deadline)
        except TimeoutError:
            raise self._timed_out(job.model) from None
        except GenerationCancelled:
            if progress.cancelled():
                raise
            raise self._timed_out(job.model) from None  # the deadline passed while waiting for a slot
        seconds = time.monotonic() - started
        return Generated(
            images=images, has_nsfw_concepts=flags, inference_seconds=seconds, served_by=job.model
        )

    def _timed_out(self, app_id: str) -> GenerationRefused:
        log.warning("fal request timed out", extra={"app_id": app_id, "seconds": self._config.task_timeout})
        return GenerationRefused(
            f"fal did not finish the request within {self._config.task_timeout:g} s",
            "upstream_timeout",
            504,
        )

    def _run(
        self, app_id: str, body: dict[str, Any], progress: Progress, deadline: float
    ) -> tuple[list[EncodedImage], list[bool]]:
        queued = self._resumed(progress, deadline) or self._submit(app_id, body, progress, deadline)
        try:
            status = self._wait(queued, progress, deadline)
        except Exception:  # cancelled, timed out or failed: fal need not go on with a request nobody reads
            if not progress.handing_back():  # but a re-run will read it
                self._cancel(queued, progress)
            raise
        output = self._result(queued, status, progress, deadline)
        images, flags = self._outputs(output, progress, deadline)
        log.info(
            "fal request finished",
            extra={"app_id": app_id, "fal_request_id": queued["request_id"], "images": len(images)},
        )
        return images, flags

    def _submit(
        self, app_id: str, body: dict[str, Any], progress: Progress, deadline: float
    ) -> dict[str, Any]:
        # A submit retried after a lost reply may queue the request twice; fal's own clients take that risk.
        response = self._exchange(
            "POST", f"{self._base_url}/{app_id}", progress, deadline, "submit", json=body
        )
        if response.status_code in (401, 403):
            # 502, not 401: the client's own credentials were accepted here; what fails is this server's
            # upstream configuration, which the client can neither see nor fix by changing its key.
            log.error(
                "fal rejected the configured key",
                extra={"app_id": app_id, "status_code": response.status_code, "key": str(self._config.key)},
            )
            raise GenerationRefused(
                f"fal rejected the configured key (HTTP {response.status_code}): "
                "the server's operator must check its fal key",
                "upstream_auth_error",
                502,
            )
        if not response.is_success:
            raise _refusal(response, "fal refused the request")
        envelope = _json_object(response)
        missing = [name for name in ("request_id", *ENVELOPE_URLS) if not isinstance(envelope.get(name), str)]
        if missing:
            raise GenerationRefused(
                f"fal's reply to the submit lacks {', '.join(missing)}", "upstream_error", 502
            )
        kept = {name: envelope[name] for name in ("request_id", *ENVELOPE_URLS)}
        progress.checkpoint(CHECKPOINT, json.dumps(kept))  # before anything else can stop the run
        log.info("fal request submitted", extra={"app_id": app_id, "fal_request_id": envelope["request_id"]})
        progress.log(f"Forwarded to fal as request {envelope['request_id']}")
        return envelope

    def _resumed(self, progress: Progress, deadline: float) -> dict[str, Any] | None:
        """The fal request an earlier run of ours submitted, when fal still knows it; None on a first run,
        or when it is gone (then it is submitted anew)."""
        kept = progress.resumed(CHECKPOINT)
        if kept is None:
            return None
        queued: dict[str, Any] = json.loads(kept)
        response = self._exchange("GET", queued["status_url"], progress, deadline, "status poll")
        if response.status_code == 404:
            progress.log(f"fal no longer knows request {queued['request_id']}; submitting again")
            return None
        progress.log(f"Resuming fal request {queued['request_id']} (submitted by an earlier run, not again)")
        return queued

    def _wait(self, queued: dict[str, Any], progress: Progress, deadline: float) -> dict[str, Any]:
        """Poll the status until COMPLETED, relaying queue moves and new log lines; the final status."""
        position = queued.get("queue_position")
        if isinstance(position, int):
            progress.log(f"fal queue position {position}")
        relayed, interval, started = 0, self._poll_first, False
        while True:
            pause(interval, progress, deadline)
            interval = min(interval * POLL_FACTOR, self._poll_max)
            response = self._exchange(
                "GET", queued["status_url"], progress, deadline, "status poll", params={"logs": "1"}
            )
            if not response.is_success:  # fal lost the request: nothing the client asked for is wrong
                raise _refusal(response, "fal could not report on the request", status_code=502)
            status = _json_object(response)
            relayed = _relay_logs(status.get("logs"), relayed, progress)
            state = status.get("status")
            if state == "IN_QUEUE" and status.get("queue_position") != position:
                position = status.get("queue_position")
                progress.log(f"fal queue position {position}")
            elif state == "IN_PROGRESS" and not started:
                started = True
                progress.log("fal started the request")
            elif state == "COMPLETED":
                return status

    def _result(
        self, queued: dict[str, Any], status: dict[str, Any], progress: Progress, deadline: float
    ) -> dict[str, Any]:
        # A failed request's result carries the failure's own 5xx: that is an answer, not a hiccup to retry.
        failed = bool(status.get("error"))
        response = self._exchange(
            "GET", queued["response_url"], progress, deadline, "result", retry_server_errors=not failed
        )
        if not response.is_success:
            raise _refusal(response, "fal could not make the images", fallback=status)
        return _json_object(response)

    def _outputs(
        self, output: dict[str, Any], progress: Progress, deadline: float
    ) -> tuple[list[EncodedImage], list[bool]]:
        described = output.get("images")
        urls = [item.get("url") for item in described or [] if isinstance(item, dict)]
        if not urls or not all(isinstance(url, str) for url in urls):
            raise GenerationRefused("fal's result has no image URLs", "upstream_error", 502)
        progress.log(f"Downloading {len(urls)} image(s) from fal")
        images = [self._download(url, progress, deadline) for url in urls]
        flags = output.get("has_nsfw_concepts")
        flags = [bool(flag) for flag in flags[: len(images)]] if isinstance(flags, list) else []
        return images, flags + [False] * (len(images) - len(flags))

    def _download(self, url: str, progress: Progress, deadline: float) -> EncodedImage:
        """One output file, fetched once (signed URLs may work only once), retried only when it failed."""
        if not url.startswith(("https://", "http://")):  # data URIs come only in sync mode, never asked for
            raise GenerationRefused("fal's output is not an http(s) URL", "upstream_error", 502)
        retries = self._http.retries(progress, deadline, _RetryVoice("output download", progress))
        while True:
            try:
                return download_output(
                    self._http.http, url, time_left(deadline, self._config.request_timeout)
                )
            except httpx.HTTPStatusError as error:
                code = error.response.status_code
                if code < 500:
                    raise GenerationRefused(
                        f"fal's output could not be downloaded (HTTP {code})", "upstream_error", 502
                    ) from None
                problem = f"HTTP {code}"
            except httpx.TransportError as error:
                problem = type(error).__name__
            except (ValueError, OSError) as error:  # too large, or not an image PIL can read
                raise GenerationRefused(
                    f"fal's output is not a usable image: {error}", "upstream_error", 502
                ) from None
            retries.failed(problem)

    def _exchange(
        self, method: str, url: str, progress: Progress, deadline: float, what: str, **request: Any
    ) -> httpx.Response:
        """One call to fal's queue with the key, retried under the backend's policy (429s, and 5xx and
        transport errors a few times); `request`: RetryingClient.send's keywords (json, params, …)."""
        voice = _RetryVoice(f"fal {what}", progress)
        return self._http.send(method, url, progress, deadline, voice, headers=self._headers(), **request)

    def _cancel(self, queued: dict[str, Any], progress: Progress) -> None:
        """Best effort: a short PUT to the cancel URL; whatever it answers, we stop waiting."""
        try:
            response = self._http.http.put(
                queued["cancel_url"],
                headers=self._headers(),
                timeout=min(CANCEL_TIMEOUT, self._config.request_timeout),
            )
            outcome: str | int = response.status_code
        except httpx.HTTPError as error:
            outcome = type(error).__name__
        log.info("fal request cancelled", extra={"fal_request_id": queued["request_id"], "outcome": outcome})
        progress.log("Cancelled the request at fal")

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Key {self._config.key.value}"}


class _RetryVoice:
    """fal's words for the retries of one call (`what`: "fal submit", "output download", …)."""

    def __init__(self, what: str, progress: Progress) -> None:
        self._what = what
        self._progress = progress

    def rate_limited(self, wait: float) -> None:
        metrics.upstream_retry("fal", "rate_limited")
        log.warning("fal rate limit", extra={"call": self._what, "retry_in": round(wait, 2)})
        self._progress.log(f"fal is rate limiting (HTTP 429); retrying in {wait:.1f} s")

    def retrying(self, problem: str, failures: int, wait: float) -> None:
        metrics.upstream_retry("fal", "error")
        log.warning(
            "fal call failed; retrying", extra={"call": self._what, "problem": problem, "attempt": failures}
        )
        self._progress.log(f"{self._what} failed ({problem}); retrying in {wait:.1f} s")

    def gave_up(self, problem: str, failures: int) -> GenerationRefused:
        log.error("fal unavailable", extra={"call": self._what, "problem": problem, "attempts": failures})
        return GenerationRefused(
            f"fal is unavailable: the {self._what} failed {failures} times (last: {problem})",
            "upstream_unavailable",
            502,
        )


class _UntilDeadline(ProgressView):
    """The request's progress, also 'cancelled' once the deadline passes: bounds the wait for a slot."""

    def __init__(self, progress: Progress, deadline: float) -> None:
        super().__init__(progress)
        self._deadline = deadline

    def cancelled(self) -> bool:
        return self._progress.cancelled() or time.monotonic() >= self._deadline


def fal_input(job: GenerationJob, own_base_url: str) -> dict[str, Any]:
    """The JSON input for fal app `job.model`: only the fields that app accepts, with URLs (not data) out."""
    endpoint = BY_APP_ID.get(job.model or "")
    accepted = set(endpoint.input_model.model_fields) if endpoint else COMMON_FIELDS
    candidates: dict[str, Any] = {
        "prompt": job.prompt,
        "num_images": job.num_images,
        "seed": job.seed,
        "guidance_scale": job.guidance_scale,
        "num_inference_steps": job.num_inference_steps,
        "output_format": job.output_format,
        "enhance_prompt": job.enhance_prompt,
        "acceleration": job.acceleration,
        "enable_safety_checker": job.enable_safety_checker,  # fal's [dev] runs its own checker
        "sync_mode": False,  # URLs, not data URIs: the worker re-hosts the files in our storage
    }
    if job.aspect_ratio is not None:
        candidates["aspect_ratio"] = job.aspect_ratio
        candidates["resolution_mode"] = job.aspect_ratio  # what [dev] calls a fixed aspect ratio
        if not accepted & {"aspect_ratio", "resolution_mode"}:  # LoRA text-to-image names it so alone
            width, height = output_size(job.aspect_ratio, None)
            candidates["image_size"] = {"width": width, "height": height}
    if job.loras:
        candidates["loras"] = [{"path": lora.path, "scale": lora.scale} for lora in job.loras]
    if job.mask is not None:
        candidates |= {"mask_url": _image_url(job.mask, own_base_url), "strength": job.strength}
    if job.safety_tolerance is not None:
        candidates["safety_tolerance"] = str(job.safety_tolerance)  # fal's enum is the strings "1".."6"
    body = {name: value for name, value in candidates.items() if name in accepted}
    urls = [_image_url(image, own_base_url) for image in job.images]
    if urls and "image_urls" in accepted:  # the multi-image apps
        body["image_urls"] = urls
    if urls and "image_url" in accepted:
        body["image_url"] = urls[0]
    if len(urls) > 1 and "reference_image_url" in accepted:  # inpainting's second image
        body["reference_image_url"] = urls[1]
    return body


def _image_url(image: ImageInput, own_base_url: str) -> str:
    url, data = image_reference(image, own_base_url)
    if url is not None:
        return url
    assert data is not None
    return f"data:image/png;base64,{base64_png(data)}"  # fal takes data URIs where it cannot fetch ours


def _relay_logs(logs: Any, relayed: int, progress: Progress) -> int:
    """Pass on the lines fal added since the last poll (it sends them all every time); the new count."""
    if not isinstance(logs, list):
        return relayed
    for entry in logs[relayed:]:
        message = entry.get("message") if isinstance(entry, dict) else None
        if isinstance(message, str) and message:
            progress.log(f"fal: {message}")
    return max(relayed, len(logs))


def _refusal(
    response: httpx.Response,
    context: str,
    *,
    status_code: int | None = None,
    fallback: dict[str, Any] | None = None,
) -> GenerationRefused:
    """fal's error answer as a refusal: its message, its status code and its error type."""
    body = _json_or_none(response)
    detail = body.get("detail") if isinstance(body, dict) else None
    fallback = fallback or {}
    text = _describe(detail) or fallback.get("error") or response.reason_phrase or "no detail"
    error_type = (
        response.headers.get("x-fal-error-type")
        or (body.get("error_type") if isinstance(body, dict) else None)
        or _first_type(detail)
        or fallback.get("error_type")
        or "upstream_error"
    )
    message = f"{context} (HTTP {response.status_code}): {text}"
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 1] + "…"
    return GenerationRefused(message, str(error_type), status_code or response.status_code)


def _describe(detail: Any) -> str:
    """fal's `detail`: a text, or FastAPI's list of {loc, msg, type} (their `input` is never echoed)."""
    if isinstance(detail, str):
        return detail
    if not isinstance(detail, list):
        return ""
    parts = []
    for item in detail:
        if isinstance(item, dict) and isinstance(item.get("msg"), str):
            loc = [str(part) for part in item.get("loc") or [] if part != "body"]
            parts.append(f"{'.'.join(loc)}: {item['msg']}" if loc else item["msg"])
    return "; ".join(parts)


def _first_type(detail: Any) -> str | None:
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        kind = detail[0].get("type")
        return kind if isinstance(kind, str) else None
    return None


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _json_object(response: httpx.Response) -> dict[str, Any]:
    body = _json_or_none(response)
    if not isinstance(body, dict):
        raise GenerationRefused(
            f"fal answered HTTP {response.status_code} with no JSON object", "upstream_error", 502
        )
    return body
