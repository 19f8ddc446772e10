"""Acceleration levels on the tiny pipeline (CPU): `none` exact, `regular` and `high` served by the same
worker, the step cache's fixed schedule, seeds, cancellation, and compilation without recompiles."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from PIL import Image

from kontextd.backends import UNMEASURED
from kontextd.backends.acceleration import Levels, build_levels
from kontextd.backends.base import GenerationCancelled, GenerationJob, ImageInput, QuietProgress
from kontextd.backends.memory import MemoryPlan
from kontextd.backends.pipeline import KontextPipelineBackend
from kontextd.backends.step_cache import FixedSchedule, Policy
from kontextd.backends.tiny import TINY_RESOLUTION_SCALE, build_tiny_pipeline

SIZE = 128  # 1024x1024 as the tiny backend shrinks it (by 8)
STEPS = 4


def make_backend(
    high: Policy | None = None,
    compile_backend: Callable[..., Any] | None = None,
    memory: MemoryPlan = UNMEASURED,
) -> tuple[KontextPipelineBackend, Levels]:
    pipeline = build_tiny_pipeline()
    compiled = compile_backend is not None
    options = {"compile_backend": compile_backend} if compiled else {}
    levels = build_levels(pipeline, "cpu", memory, weights="bf16", compile=compiled, high=high, **options)
    backend = KontextPipelineBackend(
        pipeline, name="tiny", served_by="tiny", resolution_divisor=TINY_RESOLUTION_SCALE, levels=levels
    )
    return backend, levels


@pytest.fixture(scope="module")
def scheduled() -> tuple[KontextPipelineBackend, Levels]:
    """High on the benchmark's fixed schedule: steps 0 and 2 computed, 1 and 3 reuse the cache."""
    return make_backend(high=FixedSchedule(2))


def job(level: str = "none", seed: int = 7, **fields: Any) -> GenerationJob:
    values: dict[str, Any] = {
        "prompt": "a lighthouse at dusk",
        "images": (),
        "aspect_ratio": "1:1",
        "num_images": 1,
        "seed": seed,
        "guidance_scale": 2.5,
        "num_inference_steps": STEPS,
        "output_format": "png",
        "acceleration": level,
    }
    return GenerationJob(**(values | fields))


def pixels(backend: KontextPipelineBackend, generation: GenerationJob) -> list[bytes]:
    return [image.tobytes() for image in backend.generate(generation, QuietProgress()).images]  # type: ignore[union-attr]


def plain_call(seed: int) -> list[bytes]:
    """What a user gets from diffusers directly, with the same weights, seed and size."""
    pipeline = build_tiny_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        prompt="a lighthouse at dusk",
        height=SIZE,
        width=SIZE,
        max_area=SIZE * SIZE,
        _auto_resize=False,
        num_inference_steps=STEPS,
        guidance_scale=2.5,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images
    return [image.tobytes() for image in images]


def test_none_is_bit_identical_to_a_plain_pipeline_call(
    scheduled: tuple[KontextPipelineBackend, Levels],
) -> None:
    backend, _ = scheduled
    expected = plain_call(7)
    assert pixels(backend, job("none")) == expected
    pixels(backend, job("high"))  # the other levels, run by the same worker, leave `none` exact
    pixels(backend, job("regular"))
    assert pixels(backend, job("none")) == expected


def test_every_level_gives_images_of_the_right_size(scheduled: tuple[KontextPipelineBackend, Levels]) -> None:
    backend, _ = scheduled
    reference = ImageInput("reference", lambda url: Image.new("RGB", (320, 180), (20, 120, 220)))
    for level in ("none", "regular", "high"):
        wide = backend.generate(job(level, aspect_ratio="16:9", num_images=2), QuietProgress())
        assert [image.size for image in wide.images] == [(176, 96)] * 2  # 1392x752 shrunk like tiny does
        edit = backend.generate(job(level, aspect_ratio=None, images=(reference,)), QuietProgress())
        assert [image.size for image in edit.images] == [(176, 96)]


@contextmanager
def counting_calls(*modules: torch.nn.Module) -> Iterator[list[int]]:
    calls = [0] * len(modules)

    def counter(index: int) -> Callable[..., None]:
        return lambda *args: calls.__setitem__(index, calls[index] + 1)

    handles = [module.register_forward_pre_hook(counter(index)) for index, module in enumerate(modules)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def block_calls(backend: KontextPipelineBackend, levels: Levels, level: str) -> tuple[int, int]:
    """How often the first block and the last block computed in one call at `level`."""
    transformer = levels.pipelines["high"].transformer
    first, last = transformer.transformer_blocks[0].attn, transformer.single_transformer_blocks[-1].attn
    with counting_calls(first, last) as calls:
        backend.generate(job(level), QuietProgress())
    return calls[0], calls[1]


def test_high_skips_steps_on_a_fixed_schedule(scheduled: tuple[KontextPipelineBackend, Levels]) -> None:
    backend, levels = scheduled
    assert levels.pipelines["regular"] is levels.pipelines["high"]  # one accelerated transformer
    assert levels.pipelines["none"] is not levels.pipelines["regular"]
    assert block_calls(backend, levels, "regular") == (STEPS, STEPS)
    # The first block runs every step, the others every other step.
    assert block_calls(backend, levels, "high") == (STEPS, STEPS // 2)
    assert block_calls(backend, levels, "regular") == (STEPS, STEPS)  # the cache is off again
    assert pixels(backend, job("high")) != pixels(backend, job("regular"))


def test_without_room_for_a_copy_every_level_shares_the_exact_transformer() -> None:
    backend, levels = make_backend(high=FixedSchedule(2), memory=MemoryPlan("none", False, 0, 40 * 2**30))
    assert len({id(pipeline) for pipeline in levels.pipelines.values()}) == 1
    assert levels.skipped == {
        "regular transformer (fused QKV, fp8, FlashAttention-3)": "no room for a second transformer beside "
        "the exact one"
    }
    # The cache hooks sit on the exact transformer now, and pass it through unchanged but for `high`.
    assert pixels(backend, job("none")) == pixels(backend, job("regular")) == plain_call(7)
    assert block_calls(backend, levels, "high") == (STEPS, STEPS // 2)
    assert pixels(backend, job("none")) == plain_call(7)


def test_equal_seeds_give_equal_images(scheduled: tuple[KontextPipelineBackend, Levels]) -> None:
    backend, _ = scheduled
    for level in ("none", "regular", "high"):
        first = pixels(backend, job(level, seed=11, num_images=2))
        assert pixels(backend, job(level, seed=11, num_images=2)) == first
        assert pixels(backend, job(level, seed=12, num_images=2)) != first
        assert first[0] != first[1]  # a batch draws different noise per image


class CancelAt(QuietProgress):
    def __init__(self, step: int) -> None:
        self._step = step

    def step(self, step: int, total: int) -> None:
        if step == self._step:
            raise GenerationCancelled


def test_cancel_mid_run_leaves_every_level_as_it_was(
    scheduled: tuple[KontextPipelineBackend, Levels],
) -> None:
    backend, _ = scheduled
    before = {level: pixels(backend, job(level)) for level in ("none", "high")}
    with pytest.raises(GenerationCancelled):
        backend.generate(job("high"), CancelAt(2))  # the step cache holds state mid-run
    assert {level: pixels(backend, job(level)) for level in before} == before


def test_default_high_uses_the_threshold_and_says_what_it_skipped() -> None:
    backend, levels = make_backend()
    assert levels.applied == {
        "none": [],
        "regular": ["fused QKV"],
        "high": ["fused QKV", "first block cache (threshold 0.08)"],
    }
    assert levels.skipped == {
        "fp8": "fp8 matmuls need a CUDA GPU",
        "FlashAttention-3": "it needs a CUDA GPU",
    }
    assert [image.size for image in backend.generate(job("high"), QuietProgress()).images] == [(SIZE, SIZE)]


def test_compiled_levels_compile_at_warm_up_only() -> None:
    graphs: list[int] = []

    def counting(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Callable[..., Any]:
        graphs.append(len(graph.graph.nodes))
        return graph.forward  # runs the captured graph as it is: only dynamo's tracing is under test

    backend, levels = make_backend(compile_backend=counting)
    assert levels.applied["none"] == levels.applied["regular"][-1:] == ["torch.compile"]
    backend.warm_up()
    # Two block classes, each for the exact and the fused transformer, at batch 1 and batch > 1.
    assert len(graphs) == 8
    reference = ImageInput("reference", lambda url: Image.new("RGB", (90, 160), (20, 200, 90)))
    for level in ("none", "regular", "high"):
        backend.generate(job(level, aspect_ratio="21:9", num_images=3), QuietProgress())
        backend.generate(job(level, aspect_ratio=None, images=(reference,)), QuietProgress())
    assert len(graphs) == 8  # other sizes, batches and edits reuse the warm-up's graphs
    assert pixels(backend, job("none")) == plain_call(7)
