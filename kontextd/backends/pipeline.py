"""FLUX.1 Kontext through diffusers' FluxKontextPipeline: the one code path for tiny and real weights."""

import time
from typing import Any

import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from kontextd.backends.base import Generated, GenerationJob, GenerationOutOfMemory, Progress
from kontextd.catalogue.resolutions import output_size, scaled

SEED_MODULUS = 2**63  # torch generators take seeds below 2**64; fold any integer a client sends into range


class KontextPipelineBackend:
    def __init__(
        self,
        pipeline: FluxKontextPipeline,
        *,
        name: str,
        served_by: str,
        resolution_divisor: int = 1,
        min_step_seconds: float = 0.0,
    ) -> None:
        self.name = name
        self.served_by = served_by
        self._pipeline = pipeline
        self._resolution_divisor = resolution_divisor
        self._min_step_seconds = min_step_seconds
        self._multiple = pipeline.vae_scale_factor * 2  # latents are packed 2x2
        pipeline.set_progress_bar_config(disable=True)  # progress goes to request logs, not stderr

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        if self._resolution_divisor == 1:
            return size
        return scaled(size, self._resolution_divisor, self._multiple)

    def generate(self, job: GenerationJob, progress: Progress) -> Generated:
        source = job.image.load() if job.image is not None else None
        width, height = self.output_size(output_size(job.aspect_ratio, source.size if source else None))
        image = None
        if source is not None:
            # We choose the size from the table ourselves, so the pipeline must not resize again.
            image = source.resize((width, height), Image.Resampling.LANCZOS)
        generator = torch.Generator(device=self._pipeline.device).manual_seed(job.seed % SEED_MODULUS)
        step_started = time.perf_counter()

        def step_end(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            nonlocal step_started
            remaining = self._min_step_seconds - (time.perf_counter() - step_started)
            if remaining > 0:
                time.sleep(remaining)
            progress.step(step + 1, job.num_inference_steps)
            step_started = time.perf_counter()
            return tensors

        started = time.perf_counter()
        try:
            with torch.inference_mode():
                result = self._pipeline(
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
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # give the next request the memory this one held
            raise GenerationOutOfMemory(
                f"Out of memory generating {job.num_images} image(s) at {width}x{height}; try fewer images"
            ) from error
        return Generated(
            images=list(result.images),
            has_nsfw_concepts=[False] * len(result.images),
            inference_seconds=time.perf_counter() - started,
            served_by=self.served_by,
        )
