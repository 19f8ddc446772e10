"""Putting a loaded pipeline on its device in the planned memory mode (see memory.py)."""

import torch
from diffusers import FluxKontextPipeline

from kontextd.backends.errors import BackendUnavailable
from kontextd.backends.memory import MemoryPlan


def place(pipeline: FluxKontextPipeline, device: str, memory: MemoryPlan, weights: str) -> None:
    """Move `pipeline` (on the host) to `device`, offloaded as planned, with fp8 weights if asked."""
    if weights == "fp8":
        # Weights stored in float8, each layer cast up to the compute dtype for its own forward only.
        # diffusers leaves the precision-critical layers (embeddings, norms) as they were.
        transformer = pipeline.transformer
        transformer.enable_layerwise_casting(
            storage_dtype=torch.float8_e4m3fn, compute_dtype=transformer.dtype
        )
    try:
        if memory.offload == "model":
            pipeline.enable_model_cpu_offload(device=device)
        elif memory.offload == "sequential":
            pipeline.enable_sequential_cpu_offload(device=device)
        else:
            pipeline.to(device)
    except torch.OutOfMemoryError as error:
        raise BackendUnavailable(
            f"out of memory placing the model on {device} ({memory.describe()} when planned; another "
            "process may have taken memory since). Try --offload model or --weights fp8."
        ) from error
