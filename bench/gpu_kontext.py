"""Time FLUX.1 Kontext generation without the weights: the full architecture with random weights.

    .venv/bin/python bench/gpu_kontext.py                 # CUDA: full size, 1024x1024, 28 steps
    .venv/bin/python bench/gpu_kontext.py --device cpu    # shrunken architecture, so CI can prove it runs

Compute time does not depend on weight values, so random weights time the real model faithfully. For each
task (text-to-image, edit) and batch size it times, side by side in one run:
  - diffusers eager: the plain `pipe(...)` call every user starts from (the baseline);
  - kontextd none: the server's own generation path (KontextPipelineBackend), acceleration "none".
It prints seconds per image, images per hour, peak memory, and the fraction of the dense bf16 roofline
reached (transformer FLOPs per image divided by the peak rate, over the measured time).
"""

import argparse
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from kontextd.backends.base import GenerationJob, ImageInput, QuietProgress
from kontextd.backends.pipeline import KontextPipelineBackend
from kontextd.backends.tiny import FULL, TINY, Architecture, build_random_pipeline

TEXT_TOKENS = 512  # the pipeline pads T5 prompts to max_sequence_length


def transformer_flops(architecture: Architecture, image_tokens: int, reference_tokens: int) -> float:
    """FLOPs of one transformer forward for one image: every block's projections, MLP and attention."""
    config = architecture.transformer
    width = config["num_attention_heads"] * config["attention_head_dim"]
    blocks = config["num_layers"] + config["num_single_layers"]
    sequence = image_tokens + reference_tokens + TEXT_TOKENS
    # Per block: QKV, output and a 4x MLP (12 d^2 weights per token) plus QK^T and AV (4 S^2 d).
    return blocks * (2 * 12 * width**2 * sequence + 4 * sequence**2 * width)


@dataclass
class Measurement:
    task: str
    batch: int
    method: str
    seconds_per_image: float
    peak_memory_gib: float
    roofline: float | None


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def timed(call: Callable[[], object], device: str, repeats: int) -> float:
    call()  # warm-up: allocator, kernels, lazy initialisation
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, help="image side (default 1024 on CUDA, 128 on the CPU)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 28 on CUDA, 4 on the CPU)")
    parser.add_argument("--batches", default="1,4", help="batch sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=800.0, help="dense bf16 peak of the device")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    architecture = FULL if on_gpu else TINY
    size = args.size or (1024 if on_gpu else 128)
    steps = args.steps or (28 if on_gpu else 4)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    name = torch.cuda.get_device_name() if on_gpu else platform.processor() or platform.machine()
    print(
        f"# FLUX.1 Kontext, random weights — {time.strftime('%Y-%m-%d')} — {name} — "
        f"{'full' if on_gpu else 'tiny'} architecture, {size}x{size}, {steps} steps, "
        f"torch {torch.__version__}"
    )

    started = time.perf_counter()
    pipeline = build_random_pipeline(architecture, device=args.device, dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    print(f"(built in {time.perf_counter() - started:.1f} s)")
    # The 1:1 table size is 1024x1024; a smaller --size shrinks it the way the tiny backend does.
    backend = KontextPipelineBackend(
        pipeline, name="bench", served_by="random weights", resolution_divisor=max(1, 1024 // size)
    )
    reference = Image.new("RGB", (size, size), (120, 80, 200))
    latent_tokens = (size // 16) ** 2  # VAE /8, then 2x2 packing

    results: list[Measurement] = []
    for task in ("text-to-image", "edit"):
        image = reference if task == "edit" else None
        flops = steps * transformer_flops(architecture, latent_tokens, latent_tokens if image else 0)
        for batch in (int(part) for part in args.batches.split(",")):

            def diffusers_eager(image: Image.Image | None = image, batch: int = batch) -> object:
                return pipeline(
                    # The same work as ours: diffusers' default would rescale the reference to a
                    # table size: no change at 1024x1024, unequal work on the shrunken CPU run.
                    _auto_resize=False,
                    image=image,
                    prompt="a lighthouse at dusk",
                    height=size,
                    width=size,
                    max_area=size * size,
                    num_inference_steps=steps,
                    guidance_scale=2.5,
                    num_images_per_prompt=batch,
                    generator=torch.Generator(device=args.device).manual_seed(0),
                )

            job = GenerationJob(
                prompt="a lighthouse at dusk",
                image=ImageInput("reference", lambda url, image=image: image) if image else None,
                aspect_ratio="1:1",
                num_images=batch,
                seed=0,
                guidance_scale=2.5,
                num_inference_steps=steps,
                output_format="png",
            )

            def kontextd_none(job: GenerationJob = job) -> object:
                return backend.generate(job, QuietProgress())

            for method, call in (("diffusers eager", diffusers_eager), ("kontextd none", kontextd_none)):
                seconds = timed(call, args.device, args.repeats) / batch
                roofline = flops / (args.peak_tflops * 1e12) / seconds if on_gpu else None
                results.append(
                    Measurement(task, batch, method, seconds, peak_memory_gib(args.device), roofline)
                )

    print(
        f"{'task':<14}{'batch':>6}  {'method':<16}{'s/image':>9}{'images/h':>10}{'peak GiB':>10}"
        f"{'roofline':>10}{'vs eager':>10}"
    )
    baseline = {(m.task, m.batch): m.seconds_per_image for m in results if m.method == "diffusers eager"}
    for m in results:
        roofline = f"{m.roofline:.0%}" if m.roofline is not None else "n/a"
        speedup = baseline[(m.task, m.batch)] / m.seconds_per_image
        print(
            f"{m.task:<14}{m.batch:>6}  {m.method:<16}{m.seconds_per_image:>9.4f}"
            f"{3600 / m.seconds_per_image:>10.0f}"
            f"{m.peak_memory_gib:>10.1f}{roofline:>10}{speedup:>9.2f}x"
        )


if __name__ == "__main__":
    main()
