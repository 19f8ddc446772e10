"""Model backends: what to run, where and in which memory mode (`plan_backend`, before anything heavy loads
or the server binds), and loading one pipeline per device slot (`load_backend`).

`tiny` and `diffusers` are the same `KontextPipelineBackend`; they differ only in where the
pipeline's weights come from: built in code, or loaded with `FluxKontextPipeline.from_pretrained`.
"""

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kontextd.backends.devices import cuda_device_count, select_devices
from kontextd.backends.errors import BackendUnavailable
from kontextd.backends.memory import MemoryPlan, estimate_sizes, free_bytes, plan_memory

if TYPE_CHECKING:
    from kontextd.backends.lora_files import LoraFiles
    from kontextd.backends.pipeline import KontextPipelineBackend

DEFAULT_MODEL = "black-forest-labs/FLUX.1-Kontext-dev"
TINY_MODEL = "kontextd/tiny-random-flux-kontext"  # how responses name the tiny model
COMPILE_MODES = ("auto", "on", "off")

# Nothing measured: the tiny model (a few MB), or a node that loads no model (--workers 0).
UNMEASURED = MemoryPlan(offload="none", fast_copy=True, needed=0, free=None)


@dataclass(frozen=True)
class Slot:
    """One pipeline, and the one worker that owns it."""

    device: str  # "cpu", "cuda:0", …
    memory: MemoryPlan


@dataclass(frozen=True)
class BackendPlan:
    kind: str  # "tiny" or "diffusers"
    slots: tuple[Slot, ...]
    model: str | None
    reason: str  # why this backend: shown at start-up and on /health
    weights: str = "bf16"  # the transformer's storage: "bf16" or "fp8"
    compile: bool = False

    @property
    def device(self) -> str:
        """The devices in use, for messages: "cpu", "cuda:0, cuda:1"."""
        return ", ".join(dict.fromkeys(slot.device for slot in self.slots))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def model_is_local(model: str) -> bool:
    """True for a local directory or file, or a hub id already in the Hugging Face cache."""
    if Path(model).exists():
        return True
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model, "model_index.json"), str)
    except ValueError:  # not a valid repo id either
        return False


def _choose(backend: str, model: str, device: str) -> tuple[str, str, str | None, str]:
    """(kind, device, model, reason) for the flags, before devices and memory are looked at."""
    if backend == "tiny":
        return "tiny", "cpu", None, "--backend tiny"
    if backend == "diffusers":
        if device == "auto":
            if not _cuda_available():
                raise BackendUnavailable(
                    "--backend diffusers: no CUDA device is available (torch.cuda.is_available() is False). "
                    "Pass --device cpu to run the model on the CPU (very slow at full size), "
                    "or --backend tiny to try the server without the model."
                )
            device = "cuda"
        if device.startswith("cuda") and not _cuda_available():
            raise BackendUnavailable(f"--device {device}: no CUDA device is available")
        if model.endswith(".safetensors") and not Path(model).is_file():
            raise BackendUnavailable(f"--model {model}: no such file")
        return "diffusers", device, model, "--backend diffusers"
    if backend == "auto":
        if not _cuda_available():
            return (
                "tiny",
                "cpu",
                None,
                "auto: no CUDA device (torch.cuda.is_available() is False), so the tiny model",
            )
        if not model_is_local(model):
            return (
                "tiny",
                "cpu",
                None,
                f"auto: {model} is not a local path nor in the Hugging Face cache, so the tiny model; "
                "run once with --backend diffusers (and HF_TOKEN for the gated repo) to download it",
            )
        cuda = device if device.startswith("cuda") else "cuda"
        return "diffusers", cuda, model, f"auto: CUDA and {model} are available"
    raise BackendUnavailable(f"--backend {backend}: unknown backend (available: auto, tiny, diffusers)")


def plan_backend(
    backend: str,
    model: str,
    device: str,
    *,
    gpus: str | None = None,
    workers: int = 1,
    offload: str = "auto",
    weights: str = "bf16",
    compile: str = "auto",
) -> BackendPlan:
    """Decide what to run, on which devices and in which memory mode, before anything heavy loads.

    Raises BackendUnavailable for an impossible ask: no CUDA for --gpus, an unknown GPU, a GPU too small.
    """
    if gpus and not _cuda_available():
        raise BackendUnavailable(
            f"--gpus {gpus}: no CUDA device is available (torch.cuda.is_available() is False)"
        )
    kind, device, chosen_model, reason = _choose(backend, model, device)
    if kind == "tiny":  # on the CPU, whatever --gpus says
        return BackendPlan(
            "tiny", (Slot("cpu", UNMEASURED),) * max(workers, 1), None, reason, compile=compile == "on"
        )
    assert chosen_model is not None
    on_cuda = device.startswith("cuda")
    if offload in ("model", "sequential") and not on_cuda:
        raise BackendUnavailable(f"--offload {offload}: offloading needs a CUDA device to offload from")
    devices = select_devices(device, gpus, workers, cuda_device_count())
    if on_cuda and workers > 1:
        reason += f"; one worker per GPU (--workers {workers} applies to CPU pipelines)"
    slots = tuple(Slot(each, UNMEASURED) for each in devices)
    # A node with no workers loads nothing, however small its GPU; weights that are nowhere fail to load.
    sizes = estimate_sizes(chosen_model, DEFAULT_MODEL, dtype_bytes=2 if on_cuda else 4) if workers else None
    if sizes is not None:
        # The accelerated copy is made in bf16 before fp8 quantisation shrinks it: plan for its peak.
        fast_copy = sizes.transformer if weights == "bf16" else 0
        sharing = 1 if on_cuda else len(devices)  # CPU pipelines share the host's memory
        slots = tuple(
            Slot(
                each,
                plan_memory(
                    each,
                    free_bytes(each, sharing),
                    sizes,
                    offload=offload,
                    weights=weights,
                    fast_copy=fast_copy,
                ),
            )
            for each in devices
        )
    compiled = compile == "on" or (compile == "auto" and on_cuda)
    return BackendPlan("diffusers", slots, chosen_model, reason, weights=weights, compile=compiled)


def load_backend(
    plan: BackendPlan, slot: Slot, *, tiny_step_seconds: float = 0.0, lora_files: "LoraFiles | None" = None
) -> "KontextPipelineBackend":
    """Build the pipeline of one slot, on its device, with every acceleration level prepared."""
    import torch

    from kontextd.backends.acceleration import build_levels
    from kontextd.backends.pipeline import KontextPipelineBackend

    if slot.device == "cpu" and len(plan.slots) > 1:
        # CPU pipelines run side by side: split the cores rather than oversubscribe them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // len(plan.slots)))
    on_device = torch.cuda.device(slot.device) if slot.device.startswith("cuda") else contextlib.nullcontext()
    with on_device:
        if plan.kind == "tiny":
            from kontextd.backends.tiny import TINY_RESOLUTION_SCALE, build_tiny_pipeline

            pipeline = build_tiny_pipeline()  # the same weights in every slot: equal seeds, equal images
            levels = build_levels(pipeline, slot.device, slot.memory, weights="bf16", compile=plan.compile)
            return KontextPipelineBackend(
                pipeline,
                name="tiny",
                served_by=TINY_MODEL,
                resolution_divisor=TINY_RESOLUTION_SCALE,
                min_step_seconds=tiny_step_seconds,
                levels=levels,
                lora_files=lora_files,
            )
        from kontextd.backends.placement import place
        from kontextd.backends.weights import compute_dtype, load_pretrained

        assert plan.model is not None
        pipeline = load_pretrained(plan.model, compute_dtype(slot.device))
        place(pipeline, slot.device, slot.memory, plan.weights)
        levels = build_levels(pipeline, slot.device, slot.memory, weights=plan.weights, compile=plan.compile)
        return KontextPipelineBackend(
            pipeline, name="diffusers", served_by=plan.model, levels=levels, lora_files=lora_files
        )
