"""Memory modes through the real load path: fp8 weights (layerwise casting) on saved tiny weights."""

from pathlib import Path

import pytest
import torch

from kontextd.backends import load_backend, plan_backend
from kontextd.backends.base import GenerationJob, QuietProgress
from kontextd.backends.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-kontext")
    build_tiny_pipeline().save_pretrained(directory)
    return directory


def test_fp8_weights_load_and_generate(saved_pipeline: Path) -> None:
    plan = plan_backend("diffusers", str(saved_pipeline), "cpu", weights="fp8", compile="on")
    backend = load_backend(plan, plan.slots[0])
    levels = backend.levels
    transformer = levels.pipelines["none"].transformer
    stored = {parameter.dtype for parameter in transformer.parameters()}
    assert stored == {torch.float8_e4m3fn, torch.float32}  # norms and embeddings stay in float32
    linear = transformer.transformer_blocks[0].attn.to_q
    assert linear.weight.dtype == torch.float8_e4m3fn
    # One transformer only: every level runs it, uncompiled (the casting hooks do not compile).
    assert len({id(pipeline) for pipeline in levels.pipelines.values()}) == 1
    assert levels.skipped["torch.compile"] == "layerwise fp8 casting hooks do not compile"
    assert "--weights fp8 keeps a single transformer" in levels.skipped.values()
    job = GenerationJob(
        prompt="make it blue",
        images=(),
        aspect_ratio="1:1",
        num_images=1,
        seed=3,
        guidance_scale=2.5,
        num_inference_steps=2,
        output_format="png",
        acceleration="high",
    )
    images = backend.generate(job, QuietProgress()).images
    assert [image.size for image in images] == [(1024, 1024)]  # the real table: not shrunk like tiny
    assert linear.weight.dtype == torch.float8_e4m3fn  # cast up for each forward only
