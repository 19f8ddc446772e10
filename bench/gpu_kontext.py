"""Time FLUX.1 Kontext generation without the weights: the full architecture with random weights.

    .venv/bin/python bench/gpu_kontext.py                 # CUDA: full size, 1024x1024, 28 steps
    .venv/bin/python bench/gpu_kontext.py --device cpu    # shrunken architecture, so CI can prove it runs

Compute time does not depend on weight values, so random weights time the real model faithfully. For each
task (text-to-image, edit) and batch size it times, side by side in one run:
  - diffusers eager: the plain `pipe(...)` call every user starts from (the baseline);
  - kontextd none, regular, high: the server's own generation path (KontextPipelineBackend) at each
    acceleration level, prepared and warmed up as the server does at start-up (compilation is not timed).
`high`'s step cache runs on a fixed schedule (every --cache-every'th step computed, the others reuse the
cache): the adaptive rule the server uses decides from activations, meaningless with random weights.
It prints seconds per image, images per hour, peak memory, and the fraction of the dense bf16 roofline
reached (transformer FLOPs per image divided by the peak rate, over the measured time).
"""

import argparse
import platform
import resource
import time
from collections.abc import Callable

import torch
from PIL import Image

from kontextd.backends.acceleration import LEVELS, build_levels
from kontextd.backends.base import GenerationJob, ImageInput, QuietProgress
from kontextd.backends.memory import MemoryPlan
from kontextd.backends.pipeline import KontextPipelineBackend
from kontextd.backends.step_cache import FixedSchedule
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
    parser.add_argument(
        "--compile", choices=["auto", "on", "off"], default="auto", help="as kontextd's flag: auto = on CUDA"
    )
    parser.add_argument("--cache-every", type=int, default=2, help="high: compute every n-th step")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    architecture = FULL if on_gpu else TINY
    size = args.size or (1024 if on_gpu else 128)
    steps = args.steps or (28 if on_gpu else 4)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    compile_blocks = args.compile == "on" or (args.compile == "auto" and on_gpu)
    batches = [int(part) for part in args.batches.split(",")]
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
    reference = Image.new("RGB", (size, size), (120, 80, 200))
    latent_tokens = (size // 16) ** 2  # VAE /8, then 2x2 packing
    tasks = {"text-to-image": None, "edit": reference}
    seconds: dict[tuple[str, int, str], tuple[float, float]] = {}

    # diffusers eager first, on the untouched pipeline: preparing the levels compiles its blocks in place.
    for task, image in tasks.items():
        for batch in batches:

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

            seconds[(task, batch, "diffusers eager")] = (
                timed(diffusers_eager, args.device, args.repeats) / batch,
                peak_memory_gib(args.device),
            )

    started = time.perf_counter()
    # Everything resident with room for the accelerated copy, as the server plans on an 80 GB GPU.
    levels = build_levels(
        pipeline,
        args.device,
        MemoryPlan("none", fast_copy=True, needed=0, free=None),
        weights="bf16",
        compile=compile_blocks,
        high=FixedSchedule(args.cache_every),
    )
    # The 1:1 table size is 1024x1024; a smaller --size shrinks it the way the tiny backend does.
    backend = KontextPipelineBackend(
        pipeline,
        name="bench",
        served_by="random weights",
        resolution_divisor=max(1, 1024 // size),
        levels=levels,
    )
    backend.warm_up()
    print(f"(levels prepared and warmed up in {time.perf_counter() - started:.1f} s)")
    for level in LEVELS:
        print(f"# {level}: {', '.join(levels.applied[level]) or 'exact'}")
    for feature, reason in levels.skipped.items():
        print(f"# skipped {feature}: {reason}")

    for task, image in tasks.items():
        for batch in batches:
            for level in LEVELS:
                job = GenerationJob(
                    prompt="a lighthouse at dusk",
                    images=(ImageInput("reference", lambda url, image=image: image),) if image else (),
                    aspect_ratio="1:1",
                    num_images=batch,
                    seed=0,
                    guidance_scale=2.5,
                    num_inference_steps=steps,
                    output_format="png",
                    acceleration=level,
                )
                seconds[(task, batch, f"kontextd {level}")] = (
                    timed(lambda job=job: backend.generate(job, QuietProgress()), args.device, args.repeats)
                    / batch,
                    peak_memory_gib(args.device),
                )

    print(
        f"{'task':<14}{'batch':>6}  {'method':<18}{'s/image':>9}{'images/h':>10}{'peak GiB':>10}"
        f"{'roofline':>10}{'vs eager':>10}"
    )
    for task, image in tasks.items():
        flops = steps * transformer_flops(architecture, latent_tokens, latent_tokens if image else 0)
        for batch in batches:
            baseline = seconds[(task, batch, "diffusers eager")][0]
            for method in ("diffusers eager", *(f"kontextd {level}" for level in LEVELS)):
                per_image, peak = seconds[(task, batch, method)]
                roofline = f"{flops / (args.peak_tflops * 1e12) / per_image:.0%}" if on_gpu else "n/a"
                print(
                    f"{task:<14}{batch:>6}  {method:<18}{per_image:>9.4f}{3600 / per_image:>10.0f}"
                    f"{peak:>10.1f}{roofline:>10}{baseline / per_image:>9.2f}x"
                )


if __name__ == "__main__":
    main()
