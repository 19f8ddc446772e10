"""Black Forest Labs' API as a backend: the real FLUX.1 Kontext [pro]/[max], one BFL task per image.

A request for n images becomes n tasks (seeds seed .. seed+n-1) run at once on threads of their own, each
holding one slot of the key's concurrency limits from submit to downloaded image. Each task polls the
`polling_url` BFL returned (it may be another region's host) and downloads `result.sample` as soon as it is
Ready, since the signed URL expires minutes later. BFL has no cancel API: a cancelled request simply stops
polling and abandons its tasks.

Each task's polling URL is kept with the request (Progress.checkpoint) as soon as BFL accepts it: a re-run
of the request (its worker crashed or was stopped) polls the tasks it finds there instead of submitting
them, and paying for them, again; only a task BFL no longer knows is submitted anew.

The key travels only in the `x-key` header to BFL's API hosts (never to sample URLs, never in a message).
"""

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
from PIL import Image

from kontextd import __version__, metrics
from kontextd.backends.base import (
    EncodedImage,
    Generated,
    GenerationCancelled,
    GenerationJob,
    GenerationRefused,
    Progress,
)
from kontextd.backends.upstream.common import (
    WAIT_SLICE,
    ConcurrencyLimits,
    ProgressView,
    RetryingClient,
    RetryPolicy,
    backoff,
    base64_png,
    download_output,
    image_reference,
    sleep_unless_cancelled,
    time_left,
)
from kontextd.routing import UpstreamConfig
from kontextd.worker.encoding import CONTENT_TYPES, encode_image

log = logging.getLogger("kontextd.upstream.bfl")

DEFAULT_MODEL = "flux-kontext-pro"
EDIT_SAFETY_CAP = 2  # BFL caps safety_tolerance at 2 for edits (an input image)
MODERATED = frozenset({"Request Moderated", "Content Moderated"})
FAILED = frozenset({"Error", "Task not found"})
TERMINAL = MODERATED | FAILED | {"Ready"}
EXPIRED_SAMPLE = frozenset({403, 404, 410})  # what a signed sample URL answers once it has expired
MAX_DETAIL = 300  # characters of an upstream error body quoted in a message


@dataclass(frozen=True)
class Timing:
    """How often to poll and how to retry; the defaults suit BFL (tasks take a few to tens of seconds)."""

    poll_first: float = 0.5  # wait before the first poll; later waits grow by poll_growth up to poll_max
    poll_growth: float = 1.5
    poll_max: float = 3.0
    retry_base: float = 1.0  # backoff after 429, 5xx and transport errors (full jitter, doubling)
    retry_cap: float = 20.0
    retries: int = 4  # 5xx or transport failures in a row before a task gives up
    downloads: int = 3  # attempts to download a sample (an expired one is re-polled for a fresh URL)


@dataclass(frozen=True)
class _Moderated:
    status: str  # "Request Moderated" or "Content Moderated"


class _TaskProgress(ProgressView):
    """What a task thread sees: log lines and checkpoints go to the request; cancelled once the request
    abandons its tasks.

    Only the request's own thread reads the real cancellation (one store read per wait slice, however many
    tasks), then sets `abandon`.
    """

    def __init__(self, progress: Progress, abandon: threading.Event) -> None:
        super().__init__(progress)
        self._abandon = abandon

    def step(self, step: int, total: int) -> None:
        pass

    def cancelled(self) -> bool:
        return self._abandon.is_set()


class BflBackend:
    name = "bfl"

    def __init__(self, config: UpstreamConfig, own_base_url: str, *, timing: Timing | None = None) -> None:
        self.config = config
        self.timing = timing or Timing()
        self._own_base_url = own_base_url
        self._limits = ConcurrencyLimits(config.max_active, config.max_active_per_model)
        connections = max(32, 2 * config.max_active)  # a poll and a download per task at most
        client = httpx.Client(
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=config.max_active),
            headers={"User-Agent": f"kontextd/{__version__}"},
            follow_redirects=False,  # a redirect must never carry x-key to another host
        )
        timing = self.timing
        # A Retry-After is honoured in full (the task's deadline bounds it), jittered so tasks spread out.
        policy = RetryPolicy(
            timing.retries, timing.retry_base, timing.retry_cap, retry_after_jitter=timing.retry_base
        )
        self._http = RetryingClient(client, policy, config.request_timeout)

    def close(self) -> None:
        self._http.close()

    def generate(self, job: GenerationJob, progress: Progress) -> Generated:
        started = time.perf_counter()
        model = job.model or DEFAULT_MODEL
        body = bfl_input(job, self._own_base_url, progress)
        abandon = threading.Event()
        task_progress = _TaskProgress(progress, abandon)
        tasks = [
            _Task(self, model, body | {"seed": job.seed + index}, index + 1, job.num_images, task_progress)
            for index in range(job.num_images)
        ]
        results = self._run_all(tasks, progress, abandon)
        images, flags = _with_placeholders(results, job.output_format)
        return Generated(images, flags, time.perf_counter() - started, served_by=model)

    def _run_all(
        self, tasks: list["_Task"], progress: Progress, abandon: threading.Event
    ) -> list[EncodedImage | _Moderated]:
        """Run the tasks at once; the first failure or a cancel ends the request and abandons the rest."""
        executor = concurrent.futures.ThreadPoolExecutor(len(tasks), thread_name_prefix="bfl-task")
        futures = [executor.submit(task.run) for task in tasks]
        try:
            pending = set(futures)
            while pending:
                if progress.cancelled():
                    if progress.handing_back():
                        progress.log("The server is stopping: the BFL tasks go on, for the re-run to resume")
                    else:
                        progress.log("Cancelled: abandoning this request's BFL tasks (BFL cannot cancel)")
                    raise GenerationCancelled
                done, pending = concurrent.futures.wait(
                    pending, timeout=WAIT_SLICE, return_when=concurrent.futures.FIRST_EXCEPTION
                )
                for future in done:
                    error = future.exception()
                    if error is not None:
                        raise error
            return [future.result() for future in futures]
        finally:
            abandon.set()  # tasks still running stop at their next wait, and send nothing more
            executor.shutdown(wait=False, cancel_futures=True)

    # The HTTP side, shared by the tasks of every request (httpx.Client is thread-safe).

    def request(self, task: "_Task", method: str, url: str, body: dict[str, Any] | None) -> httpx.Response:
        """One exchange with BFL's API, retried through 429 (until the task's deadline) and, a bounded
        number of times, through 5xx and transport errors. Other answers are returned as they are."""
        headers = {"x-key": self.config.key.value}
        return self._http.send(
            method, url, task.progress, task.deadline, _RetryVoice(task, url), json=body, headers=headers
        )

    def download(self, task: "_Task", url: str) -> EncodedImage:
        return download_output(self._http.http, url, task.timeout(), task.deadline)


class _RetryVoice:
    """BFL's words for the retries of one task's exchange with one host."""

    def __init__(self, task: "_Task", url: str) -> None:
        self._task = task
        self._host = _host(url)

    def rate_limited(self, wait: float) -> None:
        metrics.upstream_retry("bfl", "rate_limited")
        self._task.log(f"too many active tasks at BFL (HTTP 429); retrying in {wait:.1f} s")

    def retrying(self, problem: str, failures: int, wait: float) -> None:
        metrics.upstream_retry("bfl", "error")
        what = f"{problem} from {self._host}"
        self._task.log(f"{what}; retry {failures}/{self._task.backend.timing.retries} in {wait:.1f} s")
        log.warning(
            "bfl retry", extra={"task": self._task.label, "reason": what, "wait_seconds": round(wait, 2)}
        )

    def gave_up(self, problem: str, failures: int) -> GenerationRefused:
        return GenerationRefused(
            f"Black Forest Labs: task {self._task.label} failed {failures} times in a row "
            f"({problem} from {self._host})",
            "upstream_error",
            502,
        )


class _Task:
    """One BFL task: submit, poll to a terminal status, download the sample. Runs on its own thread."""

    def __init__(
        self,
        backend: BflBackend,
        model: str,
        body: dict[str, Any],
        index: int,
        count: int,
        progress: _TaskProgress,
    ) -> None:
        self.backend = backend
        self.model = model
        self.body = body
        self.label = f"{index}/{count}"
        self.checkpoint = f"bfl task {index}"  # its polling URL, for a re-run of the request
        self.progress = progress
        self.deadline = float("inf")  # set once the task holds its slot

    def run(self) -> EncodedImage | _Moderated:
        config = self.backend.config
        with self.backend._limits.slot(self.model, self.progress):
            self.deadline = time.monotonic() + config.task_timeout
            try:
                return self._run()
            except TimeoutError:
                raise GenerationRefused(
                    f"Black Forest Labs: task {self.label} did not finish within {config.task_timeout:g} s",
                    "upstream_timeout",
                    504,
                ) from None

    def _run(self) -> EncodedImage | _Moderated:
        polling_url = self._resumed() or self._submit()
        reply = self._poll_until_done(polling_url)
        status = reply["status"]
        if status in MODERATED:
            self.log(f"{status}: this image is withheld (flagged in has_nsfw_concepts)")
            return _Moderated(status)
        if status in FAILED:
            raise GenerationRefused(
                f"Black Forest Labs: task {self.label} ended with status {status!r}{_details(reply)}",
                "upstream_error",
                502,
            )
        self.log("Ready; downloading the image")
        return self._download(polling_url, reply)

    def timeout(self) -> float:
        """One exchange's limit: the configured request timeout, cut short by the task's deadline."""
        return time_left(self.deadline, self.backend.config.request_timeout)

    def log(self, message: str) -> None:
        self.progress.log(f"BFL task {self.label}: {message}")

    def _resumed(self) -> str | None:
        """The polling URL of this task as an earlier run of the request submitted it, when BFL still
        knows the task; None on a first run, or when it is gone (then it is submitted anew)."""
        polling_url = self.progress.resumed(self.checkpoint)
        if polling_url is None:
            return None
        if self._poll_once(polling_url)["status"] == "Task not found":
            self.log("the task an earlier run submitted is gone at BFL; submitting it again")
            return None
        self.log("resuming the task an earlier run submitted (not submitted again)")
        return polling_url

    def _submit(self) -> str:
        url = f"{self.backend.config.base_url}/v1/{self.model}"
        response = self.backend.request(self, "POST", url, self.body)
        _raise_for_status(response, self.model)
        reply = _json(response)
        task_id, polling_url = reply.get("id"), reply.get("polling_url")
        if not isinstance(polling_url, str) or not polling_url.startswith(("https://", "http://")):
            raise GenerationRefused(
                "Black Forest Labs accepted the task but sent no usable polling_url", "upstream_error", 502
            )
        self.progress.checkpoint(self.checkpoint, polling_url)  # before anything else can stop the run
        self.progress.log(f"BFL task {self.label} submitted (id {task_id})")
        log.info(
            "bfl task submitted", extra={"task": self.label, "model": self.model, "bfl_task_id": task_id}
        )
        return polling_url

    def _poll_until_done(self, polling_url: str) -> dict[str, Any]:
        timing = self.backend.timing
        interval, shown = timing.poll_first, ""
        while True:
            sleep_unless_cancelled(interval, self.progress, self.deadline)
            interval = min(timing.poll_max, interval * timing.poll_growth)
            reply = self._poll_once(polling_url)
            if reply["status"] in TERMINAL:
                return reply
            note = f"{reply['status']}{_percent(reply.get('progress'))}"
            if note != shown:  # one line per change, not per poll
                self.log(note)
                shown = note

    def _poll_once(self, polling_url: str) -> dict[str, Any]:
        response = self.backend.request(self, "GET", polling_url, None)
        if response.status_code == 404:
            return {"status": "Task not found"}
        _raise_for_status(response, self.model)
        reply = _json(response)
        if not isinstance(reply.get("status"), str):
            raise GenerationRefused(
                "Black Forest Labs sent a poll reply without a status", "upstream_error", 502
            )
        return reply

    def _download(self, polling_url: str, reply: dict[str, Any]) -> EncodedImage:
        """Download the sample at once; an expired URL is polled again for a fresh one, a bounded number
        of times."""
        attempts = self.backend.timing.downloads
        for attempt in range(1, attempts + 1):
            expired = False
            try:
                return self.backend.download(self, _sample_url(reply, self.label))
            except httpx.HTTPStatusError as error:
                code = error.response.status_code
                if code not in EXPIRED_SAMPLE and code < 500:
                    raise _download_failed(self.label, f"HTTP {code}") from None
                problem, expired = f"HTTP {code}", code in EXPIRED_SAMPLE
            except httpx.TransportError as error:
                problem = type(error).__name__
            except TimeoutError:
                raise
            except (ValueError, OSError) as error:  # not an image, or absurdly large
                raise _download_failed(self.label, str(error)) from None
            if attempt == attempts:
                break
            if expired:
                self.log(f"sample URL answered {problem} (expired?); asking BFL for a fresh one")
                reply = self._poll_once(polling_url)
                if reply["status"] != "Ready":
                    raise _download_failed(self.label, f"the result is gone (status {reply['status']!r})")
            else:
                timing = self.backend.timing
                wait = backoff(attempt - 1, timing.retry_base, timing.retry_cap)
                self.log(f"sample download failed ({problem}); retrying in {wait:.1f} s")
                sleep_unless_cancelled(wait, self.progress, self.deadline)
        raise _download_failed(self.label, f"{problem} after {attempts} attempts")


def bfl_input(job: GenerationJob, own_base_url: str, progress: Progress) -> dict[str, Any]:
    """The body BFL's API takes for `job`, less the seed (each task sends its own): the input image by
    URL where BFL can fetch it, else inline."""
    body: dict[str, Any] = {
        "prompt": job.prompt,
        "output_format": job.output_format,
        "prompt_upsampling": job.enhance_prompt,
    }
    if job.aspect_ratio is not None:  # absent: BFL follows the input image
        body["aspect_ratio"] = job.aspect_ratio
    for index, image in enumerate(job.images):
        name = "input_image" if index == 0 else f"input_image_{index + 1}"  # BFL's names, up to _4
        url, data = image_reference(image, own_base_url)
        if url is not None:
            body[name] = url
            progress.log(f"BFL fetches {name} from its URL")
        else:
            assert data is not None
            body[name] = base64_png(data)
            progress.log(f"Sending {name} to BFL inline (base64 PNG)")
    if job.safety_tolerance is not None:
        body["safety_tolerance"] = _safety_tolerance(job, progress)
    return body


def _safety_tolerance(job: GenerationJob, progress: Progress) -> int:
    assert job.safety_tolerance is not None
    if not job.images or job.safety_tolerance <= EDIT_SAFETY_CAP:
        return job.safety_tolerance
    progress.log(
        f"safety_tolerance {job.safety_tolerance} capped at {EDIT_SAFETY_CAP}: "
        f"Black Forest Labs allows at most {EDIT_SAFETY_CAP} when editing an image"
    )
    log.info("bfl safety tolerance capped", extra={"asked": job.safety_tolerance, "sent": EDIT_SAFETY_CAP})
    return EDIT_SAFETY_CAP


def _with_placeholders(
    results: list[EncodedImage | _Moderated], output_format: str
) -> tuple[list[EncodedImage], list[bool]]:
    """The images in seed order, each moderated one replaced by a black image of the others' size."""
    made = [result for result in results if isinstance(result, EncodedImage)]
    if not made:
        statuses = ", ".join(sorted({result.status for result in results if isinstance(result, _Moderated)}))
        what = "the image" if len(results) == 1 else f"all {len(results)} images"
        raise GenerationRefused(
            f"Black Forest Labs moderated {what} ({statuses}): the prompt or image was flagged by its "
            "content policy",
            "content_policy_violation",
            422,
        )
    width, height = made[0].width, made[0].height
    black = Image.new("RGB", (width, height))
    placeholder = EncodedImage(
        encode_image(black, output_format), CONTENT_TYPES[output_format], width, height
    )
    images = [result if isinstance(result, EncodedImage) else placeholder for result in results]
    return images, [isinstance(result, _Moderated) for result in results]


def _raise_for_status(response: httpx.Response, model: str) -> None:
    """Turn BFL's refusals into messages the client can act on (never quoting the key)."""
    code = response.status_code
    if code < 400:
        return
    if code == 402:
        raise GenerationRefused(
            "Black Forest Labs: out of credits (HTTP 402); add credits to the account of the configured key",
            "upstream_out_of_credits",
            402,
        )
    if code in (401, 403):
        raise GenerationRefused(
            f"Black Forest Labs rejected the configured API key (HTTP {code}); check BFL_API_KEY or the "
            "[bfl] key_file of this server",
            "upstream_auth_error",
            502,
        )
    if code == 422:
        raise GenerationRefused(
            f"Black Forest Labs rejected the request: {_error_text(response)}", "upstream_invalid_input", 422
        )
    if code == 404:
        raise GenerationRefused(
            f"Black Forest Labs: not found (HTTP 404) for model {model!r}: {_error_text(response)}",
            "upstream_error",
            502,
        )
    raise GenerationRefused(
        f"Black Forest Labs answered HTTP {code}: {_error_text(response)}", "upstream_error", 502
    )


def _error_text(response: httpx.Response) -> str:
    """BFL's own words: FastAPI's detail (locations and messages only, never the echoed input)."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                where = ".".join(str(part) for part in item.get("loc", []) if part != "body")
                parts.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
        text = "; ".join(parts)
    elif detail is not None:
        text = str(detail)
    else:
        text = response.text
    return text.strip()[:MAX_DETAIL] or response.reason_phrase


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        reply = response.json()
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise GenerationRefused(
            f"Black Forest Labs sent an unreadable reply (HTTP {response.status_code})", "upstream_error", 502
        )
    return reply


def _sample_url(reply: dict[str, Any], label: str) -> str:
    result = reply.get("result")
    sample = result.get("sample") if isinstance(result, dict) else None
    if not isinstance(sample, str) or not sample.startswith(("https://", "http://")):
        raise _download_failed(label, "the Ready reply has no result.sample URL")
    return sample


def _download_failed(label: str, why: str) -> GenerationRefused:
    return GenerationRefused(
        f"Black Forest Labs: could not download the image of task {label}: {why}", "upstream_error", 502
    )


def _details(reply: dict[str, Any]) -> str:
    details = reply.get("details") or reply.get("result")
    return f" ({str(details)[:MAX_DETAIL]})" if details else ""


def _percent(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    return f" {value * 100 if value <= 1 else value:.0f}%"


def _host(url: str) -> str:
    return httpx.URL(url).host
