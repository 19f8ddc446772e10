"""The backend interface: a validated request in, images out."""

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from kontextd.fetch.guard import FetchError


class GenerationCancelled(Exception):
    """Raised from a step callback to stop a generation between denoising steps."""


class GenerationOutOfMemory(Exception):
    """The device ran out of memory for this request; the backend has freed what it could and goes on."""


class GenerationRefused(Exception):
    """The request cannot be served as asked (moderated, out of credits, rejected upstream): the message
    is what the client reads; `error_type` and `status_code` are fal's for that kind of refusal."""

    def __init__(self, message: str, error_type: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type
        self.status_code = status_code


Field = tuple[str | int, ...]  # where a value sits in the request body: ("image_urls", 1)


class InputUnusable(Exception):
    """A field of the request turned out unusable when the backend came to it (an image that cannot be
    fetched or decoded, a LoRA file that is no LoRA): where it sits, its value as the client gave it, and
    fal's error type and message, which the client reads in a 422 like any refused input."""

    def __init__(
        self, field: Field, value: str, error_type: str, message: str, ctx: dict | None = None
    ) -> None:
        super().__init__(message)
        self.field = field
        self.value = value
        self.error_type = error_type
        self.message = message
        self.ctx = ctx or {}


class ImageInput:
    """An image to edit: its URL as the client gave it, decoded only when a backend asks for pixels.

    Upstream backends may hand a reachable URL on without downloading it; local ones call `load()`.
    `field` is where the URL sits in the request, for the error a client reads when it cannot be had.
    """

    def __init__(self, url: str, loader: Callable[[str], Image.Image], field: Field = ("image_url",)) -> None:
        self.url = url
        self.field = field
        self._loader = loader
        self._image: Image.Image | None = None
        self._lock = threading.Lock()

    def load(self) -> Image.Image:
        """The decoded RGB image (fetched once); raises InputUnusable when it cannot be had."""
        with self._lock:
            if self._image is None:
                try:
                    self._image = self._loader(self.url)
                except FetchError as error:
                    raise InputUnusable(
                        self.field, self.url, error.error_type, error.message, error.ctx
                    ) from error
            return self._image


@dataclass(frozen=True)
class LoraWeight:
    """One LoRA a request asks for: `path` as the client gave it (a URL, a Hugging Face repo id or a name
    in the operator's LoRA directory), with the weight of its effect."""

    path: str
    scale: float = 1.0


@dataclass(frozen=True)
class GenerationJob:
    """One request as every backend (and the worker storing its images) sees it, whatever endpoint it came
    through: built once from the validated input by `kontextd.catalogue.endpoints.generation_job`."""

    prompt: str
    # The images to edit, in the client's order (the output follows the first); none for text-to-image.
    images: tuple[ImageInput, ...]
    aspect_ratio: (
        str | None
    )  # as asked; None: follow the input image (edits) — text-to-image always names one
    num_images: int
    seed: int  # as asked, or drawn at random when the request named none (reported in the output)
    guidance_scale: float
    num_inference_steps: int
    output_format: str  # "jpeg" or "png"
    sync_mode: bool = False  # the output as data URIs rather than stored files
    safety_tolerance: int | None = None  # 1 (strict) .. 6; None where the endpoint has no such field
    enable_safety_checker: bool = True  # [dev]'s field; every other endpoint is always checked
    enhance_prompt: bool = False
    acceleration: str = "none"
    model: str | None = None  # the routed model, for backends serving several (upstream APIs)
    loras: tuple[LoraWeight, ...] = ()  # applied together, each at its scale; none: the base model
    # Inpainting: repaint images[0] where the mask is white (images[1], when given, is the reference to
    # take the new content from), keeping `strength` of the noise there (1: all new).
    mask: ImageInput | None = None
    strength: float = 1.0


@dataclass(frozen=True)
class EncodedImage:
    """An image already in its final encoding (an upstream's file), stored as is rather than re-encoded."""

    data: bytes
    content_type: str
    width: int
    height: int


@dataclass(frozen=True)
class Generated:
    images: list[Image.Image | EncodedImage]
    has_nsfw_concepts: list[bool]
    inference_seconds: float
    served_by: str = ""  # the model that made the images, as the response header names it


class Progress(Protocol):
    """How a backend reports on a running request, and learns that it was cancelled."""

    def step(self, step: int, total: int) -> None:
        """After each denoising step; raises GenerationCancelled when the client cancelled."""

    def log(self, message: str) -> None:
        """A line for the request's logs (queue position upstream, retries, …)."""

    def preview(self, image: Image.Image) -> None:
        """A rough look at the image being made (kontextd.backends.previews), for status streams that ask
        for previews; best effort, and never the output itself."""

    def cancelled(self) -> bool:
        """True once the client asked to cancel, or the request is being handed back (the server stops):
        stop and raise GenerationCancelled."""

    def handing_back(self) -> bool:
        """True when the stop is the server's, not the client's: the request runs again later, so work
        kept with checkpoint() (an upstream task) is left to go on, for the re-run to resume."""

    def checkpoint(self, name: str, value: str) -> None:
        """Keep `value` (an upstream task's handle: its polling URL, its request id) with the request, so a
        re-run after its worker was lost or stopped resumes the task instead of submitting it, and paying
        for it, again. Best effort: when it cannot be kept, a re-run starts anew."""

    def resumed(self, name: str) -> str | None:
        """What an earlier run of this request kept under `name`; None on a first run."""


class Backend(Protocol):
    name: str

    def generate(self, job: GenerationJob, progress: Progress) -> Generated: ...


class QuietProgress:
    """Progress for work no client watches: warm-up runs and benchmarks."""

    def step(self, step: int, total: int) -> None:
        pass

    def log(self, message: str) -> None:
        pass

    def preview(self, image: Image.Image) -> None:
        pass

    def cancelled(self) -> bool:
        return False

    def handing_back(self) -> bool:
        return False

    def checkpoint(self, name: str, value: str) -> None:
        pass

    def resumed(self, name: str) -> str | None:
        return None
