"""What every upstream backend needs: per-key concurrency limits, backoff, and re-hosting outputs."""

import base64
import contextlib
import email.utils
import io
import math
import random
import threading
import time
from collections.abc import Iterator, Mapping

import httpx
from PIL import Image

from kontextd.backends.base import EncodedImage, GenerationCancelled, ImageInput, Progress
from kontextd.backends.upstream import upstream_can_fetch
from kontextd.worker.encoding import encode_image

MAX_OUTPUT_BYTES = 64 * 1024 * 1024  # a generated image is a few MB; refuse anything absurd
WAIT_SLICE = 0.25  # how often a waiting request looks for its cancellation


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
    return random.uniform(0, min(cap, base * 2**attempt))


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
