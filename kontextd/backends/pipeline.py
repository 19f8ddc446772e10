"""FLUX.1 Kontext through diffusers' FluxKontextPipeline: the one code path for tiny and real weights."""

import contextlib
import logging
import time
from typing import Any

import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from kontextd.backends.acceleration import Levels
from kontextd.backends.base import (
    Generated,
    GenerationJob,
    GenerationOutOfMemory,
    ImageInput,
    Progress,
    QuietProgress,
)
from kontextd.backends.errors import BackendUnavailable
from kontextd.catalogue.resolutions import output_size, scaled

log = logging.getLogger("kontextd.backends")


class KontextPipelineBackend:
    """One worker's pipeline. Pipelines keep per-call state, so each worker owns its own backend."""

    def __init__(
        self,
        pipeline: FluxKontextPipeline,
        *,
        name: str,
        served_by: str,
        resolution_divisor: int = 1,
        min_step_seconds: float = 0.0,
        levels: Levels | None = None,
    ) -> None:
        self.name = name
        self.served_by = served_by
        self.levels = levels or Levels.single(pipeline)
        self._resolution_divisor = resolution_divisor
        self._min_step_seconds = min_step_seconds
        self._multiple = pipeline.vae_scale_factor * 2  # latents are packed 2x2
        # Where the denoising runs, offloaded or not: seeds draw from a generator there.
        self.device: torch.device = pipeline._execution_device
        for each in {id(each): each for each in self.levels.pipelines.values()}.values():
            each.set_progress_bar_config(disable=True)  # progress goes to request logs, not stderr

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        if self._resolution_divisor == 1:
            return size
        return scaled(size, self._resolution_divisor, self._multiple)

    def warm_up(self) -> None:
        """Run the pipeline before the server says ready, so no request pays for first-use costs:
        torch.compile's graphs (batch 1 and batch > 1, each distinct level) and CUDA's lazy kernel loading.
        On a CPU with nothing compiled there are none: one call checks the path."""
        thorough = self.device.type == "cuda" or self.levels.compiled
        size = self.output_size((1024, 1024))
        reference = ImageInput("warm-up", lambda url: Image.new("RGB", size, (128, 128, 128)))
        for level in self.levels.distinct() if thorough else ["none"]:
            for image, count in ((None, 1), (reference, 2)) if thorough else ((None, 1),):
                job = GenerationJob(
                    prompt="warm-up",
                    image=image,
                    aspect_ratio="1:1",
                    num_images=count,
                    seed=0,
                    guidance_scale=2.5,
                    num_inference_steps=2 if level == "high" else 1,  # high: a cached step too
                    output_format="png",
                    acceleration=level,
                )
                try:
                    self.generate(job, QuietProgress())
                except GenerationOutOfMemory as error:
                    if count == 1:
                        raise BackendUnavailable(
                            f"out of memory warming up one {size[0]}x{size[1]} image on {self.device}. "
                            "Try --offload model or --weights fp8."
                        ) from error
                    # Requests for one image still fit; those for several get the usual error.
                    log.warning("out of memory warming up several images", extra={"device": str(self.device)})

    def _on_device(self) -> contextlib.AbstractContextManager[Any]:
        # The current CUDA device is per thread: make it this worker's GPU for kernels that use it.
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def generate(self, job: GenerationJob, progress: Progress) -> Generated:
        source = job.image.load() if job.image is not None else None
        width, height = self.output_size(output_size(job.aspect_ratio, source.size if source else None))
        image = None
        if source is not None:
            # We choose the size from the table ourselves, so the pipeline must not resize again.
            image = source.resize((width, height), Image.Resampling.LANCZOS)
        step_started = time.perf_counter()

        def step_end(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            nonlocal step_started
            remaining = self._min_step_seconds - (time.perf_counter() - step_started)
            if remaining > 0:
                time.sleep(remaining)
            progress.step(step + 1, job.num_inference_steps)
            step_started = time.perf_counter()
            return tensors

        with self._on_device(), self.levels.run(job.acceleration) as pipeline:
            generator = torch.Generator(device=self.device).manual_seed(job.seed)  # 0 .. 2**32-1
            started = time.perf_counter()
            try:
                with torch.inference_mode():
                    result = pipeline(
                        image=image,
                        prompt=job.prompt,
                        height=height,
                        width=width,
                        max_area=width * height,
                        _auto_resize=False,
                        num_inference_steps=job.num_inference_steps,
                        guidance_scale=job.guidance_scale,
                        num_images_per_prompt=job.num_images,
                        generator=generator,
                        callback_on_step_end=step_end,
                    )
            except torch.OutOfMemoryError as error:
                self._recover(pipeline)
                raise GenerationOutOfMemory(
                    f"Out of memory generating {job.num_images} image(s) at {width}x{height}; "
                    "try fewer images"
                ) from error
            except BaseException:  # cancelled, or failed: the next request must find the pipeline as usual
                self._recover(pipeline)
                raise
        return Generated(
            images=list(result.images),
            has_nsfw_concepts=[False] * len(result.images),
            inference_seconds=time.perf_counter() - started,
            served_by=self.served_by,
        )

    def _recover(self, pipeline: FluxKontextPipeline) -> None:
        """What an interrupted call skipped: offloaded components back to the host, cache hooks reset."""
        pipeline.maybe_free_model_hooks()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the next request the memory this one held
