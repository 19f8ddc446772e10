"""The backend interface: a validated request in, images out."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from PIL import Image


class GenerationCancelled(Exception):
    """Raised from a step callback to stop a generation between denoising steps."""


class GenerationOutOfMemory(Exception):
    """The device ran out of memory for this request; the backend has freed what it could and goes on."""


@dataclass(frozen=True)
class GenerationJob:
    prompt: str
    image: Image.Image | None  # the image to edit; None for text-to-image
    size: tuple[int, int]  # (width, height) from the Kontext resolution table
    num_images: int
    seed: int
    guidance_scale: float
    num_inference_steps: int


@dataclass(frozen=True)
class Generated:
    images: list[Image.Image]
    has_nsfw_concepts: list[bool]
    inference_seconds: float


# Called after each denoising step with (step, total); may raise GenerationCancelled.
StepCallback = Callable[[int, int], None]


class Backend(Protocol):
    name: str

    def generate(self, job: GenerationJob, on_step: StepCallback) -> Generated: ...
