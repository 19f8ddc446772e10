"""Loading FLUX.1 Kontext weights: a hub id, a local pipeline directory, or a .safetensors transformer."""

import os
from pathlib import Path

import torch
from diffusers import FluxKontextPipeline, FluxTransformer2DModel
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

from kontextd.backends import DEFAULT_MODEL
from kontextd.backends.errors import BackendUnavailable


def compute_dtype(device: str) -> torch.dtype:
    # bf16 is what the model was trained in; CPUs run float32 faster and exactly.
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_pretrained(model: str, dtype: torch.dtype) -> FluxKontextPipeline:
    """The pipeline in `dtype`, on the host: placement.place() moves it to its device."""
    token = os.environ.get("HF_TOKEN") or None
    path = Path(model)
    try:
        if path.is_dir():
            return FluxKontextPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)
        if path.suffix == ".safetensors":
            # A fine-tuned transformer alone: the text encoders and VAE come from the base model.
            transformer = FluxTransformer2DModel.from_single_file(path, dtype=dtype)
            return FluxKontextPipeline.from_pretrained(
                DEFAULT_MODEL, transformer=transformer, dtype=dtype, token=token
            )
        return FluxKontextPipeline.from_pretrained(model, dtype=dtype, token=token)
    except GatedRepoError as error:
        raise BackendUnavailable(
            f"{model} is gated: accept its licence on the Hugging Face Hub, then set HF_TOKEN"
        ) from error
    except (RepositoryNotFoundError, LocalEntryNotFoundError) as error:
        raise BackendUnavailable(
            f"{model}: weights not found locally and not downloadable here ({error.__class__.__name__}). "
            "Pass a local directory with --model, or allow the download (HF_TOKEN for the gated repo)."
        ) from error
    except ValueError as error:  # neither an existing path nor a well-formed repo id
        raise BackendUnavailable(
            f"--model {model}: no such directory, file or Hugging Face repo id"
        ) from error
    except OSError as error:  # diffusers reports missing files and offline misses as OSError
        # The first line says what is missing; diffusers' pointer to a traceback we do not show is dropped.
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].split(" Please check out")[0]
        raise BackendUnavailable(
            f"could not load {model}: {reason} Pass a local pipeline directory with --model, "
            "or allow the download (HF_TOKEN for the gated repo)."
        ) from error
