"""FLUX.1 Kontext through diffusers' FluxKontextPipeline: the one code path for tiny and real weights."""

import contextlib
import logging
import time
from typing import Any

import torch
from diffusers import FluxKontextInpaintPipeline, FluxKontextPipeline
from PIL import Image

from kontextd.backends.acceleration import Levels
from kontextd.backends.base import (
    Generated,
    GenerationJob,
    GenerationOutOfMemory,
    GenerationRefused,
    ImageInput,
    Progress,
    QuietProgress,
)
from kontextd.backends.errors import BackendUnavailable
from kontextd.backends.lora_adapters import LoraAdapters
from kontextd.backends.lora_files import LoraFiles
from kontextd.backends.previews import latent_preview, wants_preview
from kontextd.backends.references import reference_image
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
        lora_files: LoraFiles | None = None,
    ) -> None:
        self.name = name
        self.served_by = served_by
        self.levels = levels or Levels.single(pipeline)
        # LoRAs go on the exact transformer, which every level without a copy of its own shares.
        self._adapters = LoraAdapters(self.levels.pipelines["none"], lora_files) if lora_files else None
        self._inpainters: dict[int, FluxKontextInpaintPipeline] = {}
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
        reference = (ImageInput("warm-up", lambda url: Image.new("RGB", size, (128, 128, 128))),)
        for level in self.levels.distinct() if thorough else ["none"]:
            for images, count in (((), 1), (reference, 2)) if thorough else (((), 1),):
                job = GenerationJob(
                    prompt="warm-up",
                    images=images,
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
        width, height = self.output_size(output_size(job.aspect_ratio, self._first_size(job)))
        inputs = self._image_inputs(job, (width, height))
        step_started = time.perf_counter()

        def step_end(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            nonlocal step_started
            remaining = self._min_step_seconds - (time.perf_counter() - step_started)
            if remaining > 0:
                time.sleep(remaining)
            if wants_preview(step + 1, job.num_inference_steps):
                progress.preview(latent_preview(tensors["latents"], height, width, self._multiple // 2))
            progress.step(step + 1, job.num_inference_steps)
            step_started = time.perf_counter()
            return tensors

        # LoRAs take the exact transformer: the fast one's fp8 and fused layers take no adapters.
        level = "none" if job.loras else job.acceleration
        with self._on_device(), self.levels.run(level) as pipeline:
            self._use_loras(job)
            call = self._inpainting(pipeline) if job.mask is not None else pipeline
            generator = torch.Generator(device=self.device).manual_seed(job.seed)  # 0 .. 2**32-1
            started = time.perf_counter()
            try:
                with torch.inference_mode():
                    result = call(
                        **inputs,
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

    def _first_size(self, job: GenerationJob) -> tuple[int, int] | None:
        """The size of the image the output follows (the first given), fetched now if not yet."""
        return job.images[0].load().size if job.images else None

    def _image_inputs(self, job: GenerationJob, size: tuple[int, int]) -> dict[str, Any]:
        """The pipeline's image arguments, sized by us (the output from the table), so the pipeline must
        not resize again: the references for an edit, or what inpainting repaints, after what, where."""
        sources = [each.load() for each in job.images]
        if job.mask is None:
            return {"image": reference_image(sources, size, self._multiple) if sources else None}
        image, *reference = sources
        inputs: dict[str, Any] = {
            "image": image.resize(size, Image.Resampling.LANCZOS),
            "mask_image": job.mask.load().convert("L").resize(size, Image.Resampling.LANCZOS),
            # The pipeline runs the last strength x steps of its schedule, rounded down: at least one.
            "strength": max(job.strength, 1 / job.num_inference_steps),
        }
        if reference:  # at its own nearest table size: its shape need not be the image's
            own = self.output_size(output_size(None, reference[0].size))
            inputs["image_reference"] = reference[0].resize(own, Image.Resampling.LANCZOS)
        return inputs

    def _use_loras(self, job: GenerationJob) -> None:
        if self._adapters is not None:
            self._adapters.use(job.loras)
        elif job.loras:
            raise GenerationRefused("This backend takes no LoRAs", "lora_load_error", 422)

    def _inpainting(self, pipeline: FluxKontextPipeline) -> FluxKontextInpaintPipeline:
        """The inpainting pipeline over `pipeline`'s own modules (no copy: adapters and compiled blocks
        are shared), made once per level's pipeline."""
        made = self._inpainters.get(id(pipeline))
        if made is None:
            made = FluxKontextInpaintPipeline(**pipeline.components)
            made.set_progress_bar_config(disable=True)
            self._inpainters[id(pipeline)] = made
        return made

    def _recover(self, pipeline: FluxKontextPipeline) -> None:
        """What an interrupted call skipped: offloaded components back to the host, cache hooks reset."""
        pipeline.maybe_free_model_hooks()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the next request the memory this one held
