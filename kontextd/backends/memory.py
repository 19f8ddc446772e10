"""How much device memory each memory mode needs, and which mode to run in: decided before loading.

Modes (`--offload`), and what each does with the T5 encoder (8.9 GiB in bf16, used once per request):
  none        every component stays on the GPU: fastest; T5 stays resident.
  model       diffusers' model CPU offload: each component moves to the GPU when the pipeline uses it and
              back when the next one starts, so T5 leaves the GPU as soon as the prompt is encoded and the
              transformer only arrives after; costs the host-to-device copies (a few seconds per request).
  sequential  diffusers' sequential CPU offload: weights stream to the GPU layer by layer; fits in a few
              GiB, many times slower.
`--weights fp8` stores the transformer's weights in float8 (diffusers' layerwise casting), halving it.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from kontextd.backends.errors import BackendUnavailable

GIB = 2**30
OFFLOAD_MODES = ("none", "model", "sequential")
WEIGHTS = ("bf16", "fp8")
# Activations of a 1024x1024 edit at batch 1 (8.7k tokens through the transformer, the VAE decode at full
# resolution), the CUDA context and allocator slack. An estimate: bench/gpu_kontext.py prints the peak.
WORKING_BYTES = 6 * GIB
LARGEST_LAYER_BYTES = 1 * GIB  # what sequential offload holds at once (a transformer block, T5's embedding)

# FLUX.1 Kontext [dev] parameter counts, for estimates while its weights are not on disk yet.
KONTEXT_DEV_PARAMETERS = {
    "transformer": 11_901_408_320,
    "text_encoder": 123_060_480,  # CLIP-L text model
    "text_encoder_2": 4_762_310_656,  # T5-XXL encoder
    "vae": 83_819_683,
}


@dataclass(frozen=True)
class ComponentSizes:
    """Bytes each component takes on the device, in the dtype it runs in."""

    transformer: int
    text_encoder: int
    text_encoder_2: int
    vae: int


@dataclass(frozen=True)
class MemoryPlan:
    offload: str  # "none", "model" or "sequential"
    fast_copy: bool  # room for a second, accelerated transformer beside the exact one (see acceleration.py)
    needed: int  # bytes estimated, the copy included
    free: int | None  # bytes free when planned; None where not measured (the tiny model)

    def describe(self) -> str:
        if self.free is None:
            return f"offload {self.offload}"
        return f"offload {self.offload}, about {self.needed / GIB:.1f} of {self.free / GIB:.1f} GiB free"


def needed_bytes(sizes: ComponentSizes, offload: str, weights: str) -> int:
    transformer = sizes.transformer // 2 if weights == "fp8" else sizes.transformer
    if offload == "none":
        return transformer + sizes.text_encoder + sizes.text_encoder_2 + sizes.vae + WORKING_BYTES
    if offload == "model":  # one component on the device at a time
        return max(transformer, sizes.text_encoder, sizes.text_encoder_2, sizes.vae) + WORKING_BYTES
    return LARGEST_LAYER_BYTES + WORKING_BYTES


def _alternatives(free: int, sizes: ComponentSizes, asked: tuple[str, str]) -> str:
    """The other settings that would fit, fastest first."""
    fitting = []
    for offload, weights in [("none", "fp8"), ("model", "bf16"), ("model", "fp8"), ("sequential", "bf16")]:
        need = needed_bytes(sizes, offload, weights)
        if (offload, weights) == asked or need > free:
            continue
        flags = ([f"--offload {offload}"] if offload != "none" else []) + (
            ["--weights fp8"] if weights == "fp8" else []
        )
        slow = ", much slower" if offload == "sequential" else ""
        fitting.append(f"{' '.join(flags)} (about {need / GIB:.1f} GiB{slow})")
    if not fitting:
        return "No memory mode fits: free memory on it or use a larger GPU."
    return "Try " + ", or ".join(fitting) + "."


def plan_memory(
    device: str, free: int, sizes: ComponentSizes, *, offload: str, weights: str, fast_copy: int
) -> MemoryPlan:
    """The memory mode for one GPU, or BackendUnavailable naming free vs needed and what would fit.

    `offload` is as asked ("auto" tries none, then model offload; sequential offload is never chosen
    for you, being many times slower). `fast_copy` is what a second, accelerated transformer would
    add (0: none wanted); it is kept only with everything resident and room to spare.
    """
    on_cuda = device.startswith("cuda")
    candidates = ["none", "model"] if offload == "auto" else [offload]
    if not on_cuda:
        candidates = ["none"]  # the host has nothing to offload to
    for mode in candidates:
        need = needed_bytes(sizes, mode, weights)
        # On the host, swap and page cache blur what fits: only the copy is decided; loading says the rest.
        if need <= free or not on_cuda:
            copy = mode == "none" and fast_copy > 0 and need + fast_copy <= free
            return MemoryPlan(mode, copy, need + fast_copy if copy else need, free)
    mode = candidates[-1]
    need = needed_bytes(sizes, mode, weights)
    what = f"--offload {mode}" if offload != "auto" else f"offload {mode} (the smallest --offload auto picks)"
    raise BackendUnavailable(
        f"{device} is too small for the model: {free / GIB:.1f} GiB free, {what} with --weights {weights} "
        f"needs about {need / GIB:.1f} GiB. {_alternatives(free, sizes, (mode, weights))}"
    )


def free_bytes(device: str, sharing: int = 1) -> int:
    """Free memory now on `device`; the host's available memory split `sharing` ways for the CPU."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return free
    import psutil

    return psutil.virtual_memory().available // sharing


# -- estimating component sizes from the weights on disk -----------------------------------------------


def _tensor_elements(path: Path) -> dict[str, int]:
    """Element counts from a .safetensors header (its first bytes), without reading the tensors."""
    with path.open("rb") as file:
        length = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(length))
    return {name: math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


def _folder_bytes(folder: Path, dtype_bytes: int) -> int | None:
    elements: dict[str, int] = {}  # by tensor name, so variant files (.fp16.) count once
    for path in folder.glob("*.safetensors"):
        elements.update(_tensor_elements(path))
    if elements:
        return sum(elements.values()) * dtype_bytes
    pickled = sum(path.stat().st_size for path in folder.glob("*.bin"))
    return pickled or None


def _snapshot(model: str) -> Path | None:
    """The local pipeline directory of `model`: itself, or its snapshot in the Hugging Face cache.

    Raises ValueError when `model` is neither a directory nor a Hugging Face repo id."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model, "model_index.json")
    return Path(found).parent if isinstance(found, str) else None


def estimate_sizes(model: str, base_model: str, dtype_bytes: int) -> ComponentSizes | None:
    """Component sizes from the weights' headers where they are on disk, else FLUX.1 Kontext [dev]'s (a
    download to come). None when `model` names no weights at all: loading it will say why.

    A .safetensors `model` is a transformer alone; the other components come from `base_model`.
    """
    single = Path(model) if model.endswith(".safetensors") else None
    try:
        snapshot = _snapshot(base_model if single else model)
    except ValueError:
        return None
    sizes = {}
    for name, parameters in KONTEXT_DEV_PARAMETERS.items():
        found = None
        if single is not None and name == "transformer":
            found = sum(_tensor_elements(single).values()) * dtype_bytes
        elif snapshot is not None and (snapshot / name).is_dir():
            found = _folder_bytes(snapshot / name, dtype_bytes)
        sizes[name] = found if found is not None else parameters * dtype_bytes
    return ComponentSizes(**sizes)
