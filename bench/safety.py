"""The safety checker's cost per image, side by side with encoding the same image as the worker does.

    .venv/bin/python bench/safety.py [--size 1024] [--repeats 30] [--threads 1,2]

For one `--size` square image (smooth gradients with noise, so PNG compresses it as it would a photo), the
median and p90 of `--repeats` runs, after two warm-ups, of:

- `encode png`, `encode jpeg`: `kontextd.worker.encoding.encode_image`, what the worker does next anyway;
- `check, N thread(s)`: `SafetyChecker.score` (resize to 256, centre crop 224, JPEG round trip, open_nsfw
  on onnxruntime's CPU provider with N intra-op threads), one session per thread count;
- `black out + encode png`: what a flagged image costs on top of its check.

Each row is also given as a ratio to `encode png` and `encode jpeg`. The classifier's load (checksum,
session, warm-up) is printed once per thread count. Everything runs in this process, on the CPU.
"""

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from kontextd.safety.checker import SafetyChecker, blacked_out
from kontextd.safety.config import parse_safety
from kontextd.worker.encoding import encode_image


def photo_like(size: int) -> Image.Image:
    """Deterministic: two gradients and a bright disc under Gaussian noise (sigma 6)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05).astype(np.float32)
    rgb = np.stack([200 * x + 40 * disc, 160 * y + 60 * disc, 120 * (1 - x) + 80 * disc], axis=-1)
    noise = np.random.default_rng(0).normal(0, 6, rgb.shape)
    return Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8), "RGB")


def timed(work: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median and p90 seconds of `repeats` runs after two warm-ups."""
    for _ in range(2):
        work()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        samples.append(time.perf_counter() - started)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.9))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=1024, help="pixels a side")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", default="1,2", help="onnxruntime intra-op thread counts to time")
    args = parser.parse_args()

    import onnxruntime

    image = photo_like(args.size)
    print(
        f"# {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"onnxruntime {onnxruntime.__version__}; {args.size}x{args.size} image, median of {args.repeats}"
    )
    rows: list[tuple[str, float, float]] = [
        ("encode png", *timed(lambda: encode_image(image, "png"), args.repeats)),
        ("encode jpeg", *timed(lambda: encode_image(image, "jpeg"), args.repeats)),
    ]
    for threads in (int(part) for part in args.threads.split(",") if part.strip()):
        checker = SafetyChecker(parse_safety({"threads": threads}))
        started = time.perf_counter()
        checker.load()
        print(f"# {threads} thread(s): classifier loaded in {time.perf_counter() - started:.3f} s")
        print(f"# {threads} thread(s): score of the bench image {checker.score(image):.5f}")
        label = f"check, {threads} thread{'s' if threads > 1 else ''}"
        rows.append((label, *timed(lambda checker=checker: checker.score(image), args.repeats)))
    rows.append(
        ("black out + encode png", *timed(lambda: encode_image(blacked_out(image), "png"), args.repeats))
    )

    png, jpeg = rows[0][1], rows[1][1]
    print("\n| step | median ms | p90 ms | / encode png | / encode jpeg |")
    print("|---|---|---|---|---|")
    for label, median, p90 in rows:
        print(
            f"| {label} | {median * 1e3:.1f} | {p90 * 1e3:.1f} | {median / png:.2f} | {median / jpeg:.2f} |"
        )


if __name__ == "__main__":
    main()
