"""Device slots (--gpus, --device, --workers) and the memory-mode decision, before anything loads."""

from pathlib import Path

import pytest
import torch

import kontextd.backends as backends
from kontextd.backends import DEFAULT_MODEL, BackendUnavailable, plan_backend
from kontextd.backends.devices import select_devices
from kontextd.backends.memory import (
    GIB,
    KONTEXT_DEV_PARAMETERS,
    WORKING_BYTES,
    ComponentSizes,
    estimate_sizes,
    needed_bytes,
    plan_memory,
)
from kontextd.backends.tiny import build_tiny_pipeline

NO_CUDA = not torch.cuda.is_available()
# FLUX.1 Kontext [dev] in bf16: 22.2 GiB transformer, 8.9 GiB T5, CLIP-L and the VAE.
KONTEXT = ComponentSizes(**{name: count * 2 for name, count in KONTEXT_DEV_PARAMETERS.items()})
COPY = KONTEXT.transformer  # the accelerated transformer, planned at its bf16 peak


# -- device slots ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "gpus", "workers", "count", "expected"),
    [
        ("cuda", None, 1, 2, ("cuda:0", "cuda:1")),  # every GPU by default
        ("cuda", "all", 1, 2, ("cuda:0", "cuda:1")),
        ("cuda", "1", 1, 2, ("cuda:1",)),
        ("cuda", "1,0", 4, 2, ("cuda:1", "cuda:0")),  # one worker per GPU, whatever --workers says
        ("cuda:1", None, 1, 2, ("cuda:1",)),
        ("cpu", None, 3, 0, ("cpu", "cpu", "cpu")),  # CPU: one pipeline per worker
        ("cpu", None, 0, 0, ("cpu",)),
    ],
)
def test_device_slots(
    device: str, gpus: str | None, workers: int, count: int, expected: tuple[str, ...]
) -> None:
    assert select_devices(device, gpus, workers, count) == expected


@pytest.mark.parametrize(
    ("device", "gpus", "count", "message"),
    [
        (
            "cuda",
            "2",
            2,
            r"--gpus 2: there is no GPU 2; this machine has 2 CUDA device\(s\), numbered 0 to 1",
        ),
        ("cuda", "0,x", 2, "expected all, or GPU indices like 0,1"),
        ("cuda", ",", 2, "expected all, or GPU indices like 0,1"),
        ("cuda", "0,0", 2, "listed twice"),
        ("cuda", "0", 0, r"--gpus 0: no CUDA device is available"),
        ("cpu", "0", 2, "--gpus 0 and --device cpu: choose the GPUs with one of them"),
        ("cuda:3", None, 2, "--device cuda:3: no such GPU; this machine has 2"),
        ("cuda:1", None, 0, "--device cuda:1: no CUDA device is available"),
        ("tpu", None, 0, "--device tpu: expected auto, cuda, cuda:N or cpu"),
    ],
)
def test_device_errors(device: str, gpus: str | None, count: int, message: str) -> None:
    with pytest.raises(BackendUnavailable, match=message):
        select_devices(device, gpus, 1, count)


@pytest.mark.skipif(not NO_CUDA, reason="checks a machine without CUDA")
def test_gpus_without_cuda_fail_at_plan_time() -> None:
    for backend in ("auto", "diffusers", "tiny"):
        with pytest.raises(BackendUnavailable, match="--gpus all: no CUDA device is available"):
            plan_backend(backend, DEFAULT_MODEL, "auto", gpus="all")


def test_tiny_gets_one_pipeline_per_worker() -> None:
    plan = plan_backend("tiny", "ignored", "auto", workers=3)
    assert [slot.device for slot in plan.slots] == ["cpu"] * 3
    assert plan.device == "cpu"
    assert not plan.compile


def test_offloading_needs_cuda(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="--offload model: offloading needs a CUDA device"):
        plan_backend("diffusers", str(tmp_path), "cpu", offload="model")


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, int]:
    """plan_backend on a pretend machine with two GPUs, whose free memory the test sets."""
    free = {"cuda:0": 79 * GIB, "cuda:1": 79 * GIB}
    monkeypatch.setattr(backends, "_cuda_available", lambda: True)
    monkeypatch.setattr(backends, "cuda_device_count", lambda: 2)
    monkeypatch.setattr(backends, "free_bytes", lambda device, sharing=1: free[device])
    monkeypatch.setenv(
        "HF_HUB_CACHE", str(tmp_path)
    )  # weights not downloaded: sizes from the parameter counts
    return free


def test_plan_per_gpu(two_gpus: dict[str, int]) -> None:
    two_gpus["cuda:1"] = 40 * GIB
    plan = plan_backend("diffusers", DEFAULT_MODEL, "auto", workers=4)
    assert plan.device == "cuda:0, cuda:1"
    assert [(slot.memory.offload, slot.memory.fast_copy) for slot in plan.slots] == [
        ("none", True),
        ("none", False),
    ]
    assert plan.compile  # auto: on with CUDA
    assert "one worker per GPU" in plan.reason
    assert plan_backend("diffusers", DEFAULT_MODEL, "auto", gpus="1", compile="off").device == "cuda:1"
    with pytest.raises(BackendUnavailable, match="there is no GPU 2"):
        plan_backend("diffusers", DEFAULT_MODEL, "auto", gpus="0,2")


def test_gpu_too_small_names_free_and_needed(two_gpus: dict[str, int]) -> None:
    two_gpus["cuda:1"] = 20 * GIB
    with pytest.raises(BackendUnavailable) as caught:
        plan_backend("diffusers", DEFAULT_MODEL, "cuda")
    message = str(caught.value)
    assert message.startswith("cuda:1 is too small for the model: 20.0 GiB free, offload model")
    assert "needs about 28.2 GiB" in message
    assert "Try --offload model --weights fp8 (about 17.1 GiB), or --offload sequential" in message
    # The suggestion works; an API-only node checks nothing.
    plan = plan_backend("diffusers", DEFAULT_MODEL, "cuda", offload="model", weights="fp8")
    assert [slot.memory.offload for slot in plan.slots] == ["model", "model"]
    assert plan_backend("diffusers", DEFAULT_MODEL, "cuda", workers=0).slots[1].memory.free is None


# -- the memory decision ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("free_gib", "offload", "weights", "expected"),
    [
        (79, "auto", "bf16", ("none", True)),  # H100 80 GB: everything resident, plus the fast copy
        (45, "auto", "bf16", ("none", False)),  # 48 GB: resident, no room for the copy
        (30, "auto", "bf16", ("model", False)),  # too small to keep T5 resident
        (30, "auto", "fp8", ("none", False)),  # fp8 weights fit it all
        (79, "model", "bf16", ("model", False)),  # asked: the copy needs everything resident
        (10, "sequential", "bf16", ("sequential", False)),
    ],
)
def test_memory_decision(free_gib: int, offload: str, weights: str, expected: tuple[str, bool]) -> None:
    plan = plan_memory("cuda:0", free_gib * GIB, KONTEXT, offload=offload, weights=weights, fast_copy=COPY)
    assert (plan.offload, plan.fast_copy) == expected
    assert plan.needed <= plan.free
    assert plan.needed == needed_bytes(KONTEXT, plan.offload, weights) + (COPY if plan.fast_copy else 0)


def test_memory_needs_per_mode() -> None:
    resident = KONTEXT.transformer + KONTEXT.text_encoder + KONTEXT.text_encoder_2 + KONTEXT.vae
    assert needed_bytes(KONTEXT, "none", "bf16") == resident + WORKING_BYTES
    assert needed_bytes(KONTEXT, "none", "fp8") == resident - KONTEXT.transformer // 2 + WORKING_BYTES
    assert needed_bytes(KONTEXT, "model", "bf16") == KONTEXT.transformer + WORKING_BYTES  # the largest alone
    assert needed_bytes(KONTEXT, "model", "fp8") == KONTEXT.transformer // 2 + WORKING_BYTES
    assert needed_bytes(KONTEXT, "sequential", "bf16") < 8 * GIB


@pytest.mark.parametrize(
    ("free_gib", "offload", "weights", "message"),
    [
        (
            24,
            "none",
            "bf16",
            r"cuda:0 is too small for the model: 24\.0 GiB free, --offload none with --weights bf16 needs "
            r"about 37\.4 GiB\. Try --offload model --weights fp8 \(about 17\.1 GiB\), "
            r"or --offload sequential \(about 7\.0 GiB, much slower\)\.",
        ),
        (
            27,
            "auto",
            "bf16",
            r"offload model \(the smallest --offload auto picks\) with --weights bf16 needs about "
            r"28\.2 GiB\. Try --weights fp8 \(about 26\.3 GiB\), or --offload model --weights fp8",
        ),
        (5, "auto", "fp8", "No memory mode fits: free memory on it or use a larger GPU."),
    ],
)
def test_too_small_suggests_what_fits(free_gib: int, offload: str, weights: str, message: str) -> None:
    with pytest.raises(BackendUnavailable, match=message):
        plan_memory("cuda:0", free_gib * GIB, KONTEXT, offload=offload, weights=weights, fast_copy=COPY)


def test_cpu_plans_without_offloading_or_refusing() -> None:
    plan = plan_memory("cpu", 200 * GIB, KONTEXT, offload="auto", weights="bf16", fast_copy=COPY)
    assert (plan.offload, plan.fast_copy) == ("none", True)
    # Swap and page cache blur what fits in host memory: no copy, but no refusal either.
    plan = plan_memory("cpu", 30 * GIB, KONTEXT, offload="auto", weights="bf16", fast_copy=COPY)
    assert (plan.offload, plan.fast_copy) == ("none", False)


# -- sizes from the weights ------------------------------------------------------------------------------


def test_sizes_come_from_the_weights_headers(tmp_path: Path) -> None:
    pipeline = build_tiny_pipeline()
    pipeline.save_pretrained(tmp_path / "tiny")
    sizes = estimate_sizes(str(tmp_path / "tiny"), DEFAULT_MODEL, dtype_bytes=2)
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        elements = sum(parameter.numel() for parameter in getattr(pipeline, name).parameters())
        assert getattr(sizes, name) == elements * 2, name  # T5's tied embedding counted once
    # A single-file transformer takes its size from the file; the rest from the base model.
    single = tmp_path / "tiny" / "transformer" / "diffusion_pytorch_model.safetensors"
    combined = estimate_sizes(str(single), str(tmp_path / "tiny"), dtype_bytes=4)
    assert combined == ComponentSizes(*(getattr(sizes, name) * 2 for name in KONTEXT_DEV_PARAMETERS))


def test_sizes_without_weights_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert estimate_sizes(DEFAULT_MODEL, DEFAULT_MODEL, dtype_bytes=2) == KONTEXT
    # Neither a directory nor a repo id: nothing to plan with, and loading it will say why.
    assert estimate_sizes(str(tmp_path / "nowhere"), DEFAULT_MODEL, dtype_bytes=2) is None
