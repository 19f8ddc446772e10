"""Model backends: which one to run (`plan_backend`), and loading it (`load_backend`).

`tiny` and `diffusers` are the same `KontextPipelineBackend`; they differ only in where the
pipeline's weights come from: built in code, or loaded with `FluxKontextPipeline.from_pretrained`.
"""

from dataclasses import dataclass
from pathlib import Path

from kontextd.backends.base import Backend

DEFAULT_MODEL = "black-forest-labs/FLUX.1-Kontext-dev"
TINY_MODEL = "kontextd/tiny-random-flux-kontext"  # how responses name the tiny model


class BackendUnavailable(Exception):
    """The chosen backend cannot run here; the message says why and what to do."""


@dataclass(frozen=True)
class BackendPlan:
    kind: str  # "tiny" or "diffusers"
    device: str  # "cpu", "cuda", "cuda:1", …
    model: str | None
    reason: str  # why this backend: shown at start-up and on /health


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


def plan_backend(backend: str, model: str, device: str) -> BackendPlan:
    """Decide what to run, before anything heavy loads. Raises BackendUnavailable for an impossible ask."""
    if backend == "tiny":
        return BackendPlan("tiny", "cpu", None, "--backend tiny")
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
        return BackendPlan("diffusers", device, model, "--backend diffusers")
    if backend == "auto":
        if not _cuda_available():
            return BackendPlan(
                "tiny",
                "cpu",
                None,
                "auto: no CUDA device (torch.cuda.is_available() is False), so the tiny model",
            )
        if not model_is_local(model):
            return BackendPlan(
                "tiny",
                "cpu",
                None,
                f"auto: {model} is not a local path nor in the Hugging Face cache, so the tiny model; "
                "run once with --backend diffusers (and HF_TOKEN for the gated repo) to download it",
            )
        return BackendPlan("diffusers", "cuda", model, f"auto: CUDA and {model} are available")
    raise BackendUnavailable(f"--backend {backend}: unknown backend (available: auto, tiny, diffusers)")


def load_backend(plan: BackendPlan, *, tiny_step_seconds: float = 0.0) -> Backend:
    from kontextd.backends.pipeline import KontextPipelineBackend

    if plan.kind == "tiny":
        from kontextd.backends.tiny import TINY_RESOLUTION_SCALE, build_tiny_pipeline

        return KontextPipelineBackend(
            build_tiny_pipeline(),
            name="tiny",
            served_by=TINY_MODEL,
            resolution_divisor=TINY_RESOLUTION_SCALE,
            min_step_seconds=tiny_step_seconds,
        )
    from kontextd.backends.weights import load_pretrained

    assert plan.model is not None
    return KontextPipelineBackend(
        load_pretrained(plan.model, plan.device), name="diffusers", served_by=plan.model
    )
