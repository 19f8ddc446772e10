"""The tiny offline FLUX.1 Kontext pipeline: real pipeline class, deterministic, loadable, fast."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from kontextd.backends.tiny import build_tiny_pipeline

SIZE = 128  # 1024 shrunk by 8, as the tiny backend serves it
StepTensors = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def pipe() -> FluxKontextPipeline:
    return build_tiny_pipeline(0)


def _generate(pipe: FluxKontextPipeline, **overrides: Any) -> list[Image.Image]:
    kwargs: dict[str, Any] = {
        "prompt": "a cat",
        "height": SIZE,
        "width": SIZE,
        "num_inference_steps": 4,
        "guidance_scale": 2.5,
        "max_area": SIZE * SIZE,
        "_auto_resize": False,
        "generator": torch.Generator("cpu").manual_seed(1),
    }
    if "seed" in overrides:
        kwargs["generator"] = torch.Generator("cpu").manual_seed(overrides.pop("seed"))
    kwargs.update(overrides)
    return pipe(**kwargs).images


def _encode(tokenizer: Any, prompts: list[str], max_length: int) -> torch.Tensor:
    """Tokenise exactly as FluxKontextPipeline's prompt encoders do."""
    return tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids


def _pixels(images: list[Image.Image]) -> list[bytes]:
    return [image.tobytes() for image in images]


def _weights_digest(pipe: FluxKontextPipeline) -> str:
    digest = hashlib.sha256()
    for name in ("text_encoder", "text_encoder_2", "vae", "transformer"):
        for key, tensor in sorted(getattr(pipe, name).state_dict().items()):
            digest.update(f"{name}.{key}".encode())
            digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_is_the_real_pipeline_with_real_geometry(pipe: FluxKontextPipeline) -> None:
    assert type(pipe) is FluxKontextPipeline
    assert pipe.vae_scale_factor == 8
    assert pipe.transformer.config.in_channels == 64
    assert pipe.transformer.config.guidance_embeds
    assert pipe.scheduler.config.use_dynamic_shifting
    assert pipe.scheduler.config.max_shift == 1.15
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in pipe.transformer.parameters())
    assert not any(m.training for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae, pipe.transformer))


def test_text_to_image_batch(pipe: FluxKontextPipeline) -> None:
    images = _generate(pipe, num_images_per_prompt=2)
    assert len(images) == 2
    assert all(image.size == (SIZE, SIZE) and image.mode == "RGB" for image in images)


def test_edit_output_has_requested_size(pipe: FluxKontextPipeline) -> None:
    height, width = 112, 144
    red = Image.new("RGB", (160, 96), (200, 30, 30)).resize((width, height))
    blue = Image.new("RGB", (160, 96), (30, 30, 200)).resize((width, height))
    edit = {"height": height, "width": width, "max_area": height * width}

    out = _generate(pipe, image=red, **edit)
    assert [image.size for image in out] == [(width, height)]
    # The reference image reaches the transformer: a different input gives a different edit.
    assert _pixels(out) != _pixels(_generate(pipe, image=blue, **edit))


def test_seed_and_prompt_determine_output(pipe: FluxKontextPipeline) -> None:
    reference = _pixels(_generate(pipe, seed=7))
    assert _pixels(_generate(pipe, seed=7)) == reference
    assert _pixels(_generate(pipe, seed=8)) != reference
    assert _pixels(_generate(pipe, seed=7, prompt="a dog")) != reference
    # Non-ASCII prompts are distinguished too (byte-level vocabularies, no <unk> collapse).
    assert _pixels(_generate(pipe, prompt="猫")) != _pixels(_generate(pipe, prompt="犬"))


def test_separate_builds_are_identical_and_leave_global_rng_alone(pipe: FluxKontextPipeline) -> None:
    rng_state = torch.get_rng_state()
    other = build_tiny_pipeline(0)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert _weights_digest(other) == _weights_digest(pipe)
    assert _pixels(_generate(other)) == _pixels(_generate(pipe))
    assert _weights_digest(build_tiny_pipeline(1)) != _weights_digest(pipe)


def test_weights_identical_in_a_fresh_process(pipe: FluxKontextPipeline) -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from test_tiny_pipeline import _weights_digest;"
        "from kontextd.backends.tiny import build_tiny_pipeline;"
        "print(_weights_digest(build_tiny_pipeline(0)))"
    )
    # A different hash seed catches any dependence on set/dict ordering.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "123"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert result.stdout.split()[-1] == _weights_digest(pipe)


def test_save_and_load_with_the_real_loader(pipe: FluxKontextPipeline, tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path)
    size = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    assert size < 1_000_000

    loaded = FluxKontextPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert _weights_digest(loaded) == _weights_digest(pipe)
    for name in ("tokenizer", "tokenizer_2"):
        text = "héllo 猫 🐱"
        assert getattr(loaded, name)(text).input_ids == getattr(pipe, name)(text).input_ids
    # Weights are bit-identical, but safetensors memory-maps them at addresses that are not 64-byte
    # aligned, which makes CPU matmul kernels round differently in the last bit: compare with a tolerance.
    np.testing.assert_allclose(
        _generate(loaded, output_type="np"), _generate(pipe, output_type="np"), rtol=0, atol=1e-5
    )


def test_unicode_and_very_long_prompts(pipe: FluxKontextPipeline) -> None:
    prompt = "Ünïcödé 猫が好き 🐱‍👤 ﷽ \u200b\n\t" * 200
    clip_ids = _encode(pipe.tokenizer, [prompt], pipe.tokenizer_max_length)
    t5_ids = _encode(pipe.tokenizer_2, [prompt], 512)
    assert clip_ids.shape == (1, 77)
    assert t5_ids.shape == (1, 512)
    assert int(clip_ids.max()) < pipe.text_encoder.config.vocab_size
    assert int(t5_ids.max()) < pipe.text_encoder_2.config.vocab_size
    assert clip_ids[0, -1] == pipe.tokenizer.eos_token_id
    assert t5_ids[0, -1] == pipe.tokenizer_2.eos_token_id

    images = _generate(pipe, prompt=prompt, max_sequence_length=512)
    assert images[0].size == (SIZE, SIZE)


def test_clip_pools_at_eos(pipe: FluxKontextPipeline) -> None:
    tokenizer = pipe.tokenizer
    assert tokenizer.eos_token_id == len(tokenizer) - 1 == pipe.text_encoder.config.vocab_size - 1
    ids = _encode(tokenizer, ["a cat", "a much longer prompt"], 77)
    eos_positions = torch.tensor([len("a cat") + 1, len("a much longer prompt") + 1])
    assert torch.equal((ids == tokenizer.eos_token_id).int().argmax(-1), eos_positions)
    # The legacy eos_token_id == 2 rule pools at argmax(input_ids): with EOS the highest id it agrees.
    assert torch.equal(ids.argmax(-1), eos_positions)
    with torch.no_grad():
        out = pipe.text_encoder(ids)
    assert torch.equal(out.pooler_output, out.last_hidden_state[torch.arange(2), eos_positions])


def test_step_callback_runs_each_step_and_can_abort(pipe: FluxKontextPipeline) -> None:
    steps: list[int] = []

    def record(_pipe: FluxKontextPipeline, step: int, _t: torch.Tensor, kwargs: StepTensors) -> StepTensors:
        steps.append(step)
        return kwargs

    _generate(pipe, num_inference_steps=3, callback_on_step_end=record)
    assert steps == [0, 1, 2]

    class Cancelled(Exception):
        pass

    def cancel(_pipe: FluxKontextPipeline, step: int, _t: torch.Tensor, kwargs: StepTensors) -> StepTensors:
        steps.append(step)
        if step == 1:
            raise Cancelled
        return kwargs

    steps.clear()
    with pytest.raises(Cancelled):
        _generate(pipe, num_inference_steps=5, callback_on_step_end=cancel)
    assert steps == [0, 1]
