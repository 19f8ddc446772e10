"""What every upstream backend needs: per-key concurrency limits, retried calls, and re-hosting outputs."""

import base64
import contextlib
import email.utils
import io
import math
import random
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from PIL import Image

from kontextd.backends.base import EncodedImage, GenerationCancelled, ImageInput, Progress
from kontextd.backends.upstream import upstream_can_fetch
from kontextd.worker.encoding import encode_image

MAX_OUTPUT_BYTES = 64 * 1024 * 1024  # a generated image is a few MB; refuse anything absurd
WAIT_SLICE = 0.25  # how often a waiting request looks for its cancellation


class ProgressView:
    """A request's progress as one part of a backend sees it: everything passed through to the request's
    own, but what a subclass overrides (when it counts as cancelled, where steps go)."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress

    def step(self, step: int, total: int) -> None:
        self._progress.step(step, total)

    def log(self, message: str) -> None:
        self._progress.log(message)

    def preview(self, image: Image.Image) -> None:
        self._progress.preview(image)

    def cancelled(self) -> bool:
        return self._progress.cancelled()

    def handing_back(self) -> bool:
        return self._progress.handing_back()

    def checkpoint(self, name: str, value: str) -> None:
        self._progress.checkpoint(name, value)

    def resumed(self, name: str) -> str | None:
        return self._progress.resumed(name)


class ConcurrencyLimits:
    """Upstream tasks in flight for one key: at most `total`, and at most `per_model[m]` of model m.

    Shared by every worker thread of a lane; a waiting request gives up its place when cancelled.
    """

    def __init__(self, total: int, per_model: Mapping[str, int]) -> None:
        self._total = threading.BoundedSemaphore(total)
        self._per_model = {model: threading.BoundedSemaphore(limit) for model, limit in per_model.items()}

    @contextlib.contextmanager
    def slot(self, model: str, progress: Progress) -> Iterator[None]:
        held: list[threading.BoundedSemaphore] = []
        try:
            # The model's own (tighter) limit first, so a burst of [max] never starves [pro] of slots.
            for semaphore in filter(None, (self._per_model.get(model), self._total)):
                while not semaphore.acquire(timeout=WAIT_SLICE):
                    if progress.cancelled():
                        raise GenerationCancelled
                held.append(semaphore)
            yield
        finally:
            for semaphore in reversed(held):
                semaphore.release()


def backoff(attempt: int, base: float = 1.0, cap: float = 30.0) -> float:
    """Seconds to wait before retry number `attempt` (0-based): exponential with full jitter."""
    return random.uniform(0, min(cap, base * 2 ** min(attempt, 30)))  # bounded: no float overflow


def retry_after(response: httpx.Response) -> float | None:
    """The seconds a 429/503 asks us to wait (`Retry-After`: seconds or an HTTP date), or None when the
    header is absent or unreadable. A date already past means no wait."""
    value = response.headers.get("retry-after", "").strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None
    return seconds if 0 <= seconds < math.inf else None


def time_left(deadline: float, cap: float) -> float:
    """Seconds the next exchange may take: at most `cap`, never past the (monotonic) deadline."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return min(cap, left)


def sleep_unless_cancelled(seconds: float, progress: Progress, deadline: float) -> None:
    """Sleep, waking to honour a cancellation; raise TimeoutError rather than sleep past `deadline`."""
    end = time.monotonic() + seconds
    if end > deadline:
        raise TimeoutError
    while (left := end - time.monotonic()) > 0:
        if progress.cancelled():
            raise GenerationCancelled
        time.sleep(min(WAIT_SLICE, left))
    if progress.cancelled():
        raise GenerationCancelled


def pause(seconds: float, progress: Progress, deadline: float) -> None:
    """Wait (waking for a cancellation), cut short at the deadline, which then raises TimeoutError: a
    request times out when its time is up, not before."""
    sleep_unless_cancelled(min(seconds, time_left(deadline, seconds)), progress, math.inf)
    time_left(deadline, seconds)


@dataclass(frozen=True)
class RetryPolicy:
    """How one provider's exchanges are retried: 429 always (until the deadline), 5xx and transport errors
    `retries` times in a row, each after a full-jitter backoff of `base` doubling up to `cap` seconds."""

    retries: int  # failures (5xx, transport) tolerated in a row: a try and this many more, then give up
    base: float  # seconds: the backoff before the first retry (and after a 429 without Retry-After)
    cap: float  # seconds: the longest backoff
    retry_after_max: float = (
        math.inf
    )  # a longer Retry-After is waited this long, then the call is tried again
    retry_after_jitter: float = 0.0  # up to this many seconds added to a Retry-After, so waiters spread out


class RetryVoice(Protocol):
    """A provider's own words for one exchange's retries: its lines in the request's logs and ours, and the
    error that ends them."""

    def rate_limited(self, wait: float) -> None:
        """Answered 429: tried again in `wait` seconds."""

    def retrying(self, problem: str, failures: int, wait: float) -> None:
        """Failure number `failures` ("HTTP 503", "ReadTimeout", …): tried again in `wait` seconds."""

    def gave_up(self, problem: str, failures: int) -> Exception:
        """Failed more often than the policy allows: what to raise."""


class Retries:
    """The retry state of one exchange: its failures and 429s so far, and the waits between tries, each
    ended early by a cancellation and never past the request's (monotonic) deadline."""

    def __init__(self, policy: RetryPolicy, progress: Progress, deadline: float, voice: RetryVoice) -> None:
        self._policy = policy
        self._progress = progress
        self._deadline = deadline
        self._voice = voice
        self._failures = self._limited = 0

    def failed(self, problem: str) -> None:
        """Wait out the backoff before the next try; raise the voice's error once the tries are spent."""
        self._failures += 1
        if self._failures > self._policy.retries:
            raise self._voice.gave_up(problem, self._failures)
        wait = backoff(self._failures - 1, self._policy.base, self._policy.cap)
        self._voice.retrying(problem, self._failures, wait)
        pause(wait, self._progress, self._deadline)

    def rate_limited(self, response: httpx.Response) -> None:
        """Wait as the 429 asks (Retry-After, capped and jittered), or back off when it does not say."""
        asked = retry_after(response)
        if asked is None:
            wait = backoff(self._limited, self._policy.base, self._policy.cap)
        else:
            wait = min(asked, self._policy.retry_after_max) + random.uniform(
                0, self._policy.retry_after_jitter
            )
        self._limited += 1
        self._voice.rate_limited(wait)
        pause(wait, self._progress, self._deadline)


class RetryingClient:
    """An httpx client whose calls to a provider's API are retried under one policy; `http` is the plain
    client, for calls with no such retries (downloads, best-effort cancels)."""

    def __init__(self, http: httpx.Client, policy: RetryPolicy, request_timeout: float) -> None:
        self.http = http
        self.policy = policy
        self._request_timeout = request_timeout

    def retries(self, progress: Progress, deadline: float, voice: RetryVoice) -> Retries:
        """Fresh retry state, for a loop of one's own that retries under the same policy."""
        return Retries(self.policy, progress, deadline, voice)

    def send(
        self,
        method: str,
        url: str,
        progress: Progress,
        deadline: float,
        voice: RetryVoice,
        *,
        retry_server_errors: bool = True,
        **request: Any,
    ) -> httpx.Response:
        """One exchange, tried until it is answered with anything but a 429 or (when `retry_server_errors`)
        a 5xx; each try bounded by the request timeout, cut short by the deadline. `request`: httpx's
        keywords (json, params, headers)."""
        retries = self.retries(progress, deadline, voice)
        while True:
            if progress.cancelled():
                raise GenerationCancelled
            timeout = time_left(deadline, self._request_timeout)
            try:
                response = self.http.request(method, url, timeout=timeout, **request)
            except httpx.TransportError as error:
                retries.failed(type(error).__name__)
                continue
            if response.status_code == 429:
                retries.rate_limited(response)
            elif response.status_code >= 500 and retry_server_errors:
                retries.failed(f"HTTP {response.status_code}")
            else:
                return response

    def close(self) -> None:
        self.http.close()


def download_output(
    client: httpx.Client, url: str, timeout: float, deadline: float | None = None
) -> EncodedImage:
    """Fetch a generated image from the provider's (short-lived, signed) URL, bounded in size and time.

    `timeout` bounds each network wait; `deadline` (monotonic), when given, bounds the whole download, so a
    server trickling bytes cannot hold a task past it (raises TimeoutError).
    """
    with client.stream("GET", url, timeout=timeout) as response:
        response.raise_for_status()
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > MAX_OUTPUT_BYTES:
                raise ValueError(f"upstream output larger than {MAX_OUTPUT_BYTES} bytes")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError
            chunks.append(chunk)
    data = b"".join(chunks)
    with Image.open(io.BytesIO(data)) as image:  # reads the header only: the size and the real format
        width, height = image.size
        content_type = Image.MIME.get(image.format or "", "application/octet-stream")
    return EncodedImage(data, content_type, width, height)


def image_reference(image: ImageInput, own_base_url: str) -> tuple[str | None, bytes | None]:
    """(URL, None) when the provider can fetch the image itself, else (None, PNG bytes) to send inline."""
    if upstream_can_fetch(image.url, own_base_url):
        return image.url, None
    return None, encode_image(image.load(), "png")


def base64_png(data: bytes) -> str:
    return base64.b64encode(data).decode()
