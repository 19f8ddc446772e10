"""The acceleration levels of the dev endpoint, served side by side by one worker's pipeline.

  none     the exact bf16 model. Its transformer blocks are torch.compile'd where compilation is on: that
           changes results by float rounding only (fused kernels, another summation order).
  regular  + fused QKV projections, torchao float8 dynamic-activation/weight quantisation (per row) and
           FlashAttention-3, each where available: a second transformer, kept beside the exact one.
  high     + First Block Cache (step_cache.py) on the `regular` transformer, on for `high` calls only.

`none` stays exact while the others run from the same worker because they use their own transformer,
a copy made at start-up: about +11 GiB with fp8 (22 GiB in bf16 without it) beside the 22 GiB exact
one. The copy is made only where the memory plan has room for it (memory.py); otherwise all levels share
the exact transformer, `regular` equals `none`, and `high` adds the step cache to it.

Compilation is regional, as in diffusers' `compile_repeated_blocks`: each transformer block's forward
is compiled (fullgraph, dynamic shapes), so the 19 + 38 blocks share two graphs, compiled once for all
table sizes and batch sizes; the warm-up (KontextPipelineBackend.warm_up) compiles them before the
server says ready. Recompiles are bounded: dynamic shapes leave only the batch-size-1 specialisation, so
each block class has at most (exact, fast) x (batch 1, batch > 1) graphs per GPU, under the raised
dynamo recompile limit.
"""

import copy
import importlib.util
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import FluxKontextPipeline, FluxTransformer2DModel
from diffusers.models.attention import AttentionModuleMixin

from kontextd.backends.memory import MemoryPlan
from kontextd.backends.step_cache import Policy, StepCache, Threshold

log = logging.getLogger("kontextd.acceleration")

LEVELS = ("none", "regular", "high")
# First Block Cache thresholds from ParaAttention's FLUX.1-dev guide (diffusers docs): 0.08 for the
# bf16 model; 0.12 with fp8 dynamic quantisation, which shifts the residuals the rule compares.
BF16_THRESHOLD = 0.08
FP8_THRESHOLD = 0.12
RECOMPILE_LIMIT = 64  # per code object: 4 graphs per GPU, 16 GPUs
_UNFUSED = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


@dataclass
class Levels:
    pipelines: dict[str, FluxKontextPipeline]  # the pipeline each level calls
    cache: StepCache | None = None  # hooks on pipelines["high"].transformer
    high: Policy | None = None
    applied: dict[str, list[str]] = field(default_factory=dict)  # level -> what it adds
    skipped: dict[str, str] = field(default_factory=dict)  # feature -> why it is not used here

    @property
    def compiled(self) -> bool:
        return "torch.compile" in self.applied.get("none", [])

    @classmethod
    def single(cls, pipeline: FluxKontextPipeline) -> "Levels":
        """Every level runs the pipeline as it is."""
        return cls({level: pipeline for level in LEVELS})

    def distinct(self) -> list[str]:
        """The levels that run differently from the ones before them: what a warm-up must exercise."""
        levels = ["none"]
        if self.pipelines["regular"] is not self.pipelines["none"]:
            levels.append("regular")
        if self.cache is not None:
            levels.append("high")
        return levels

    @contextmanager
    def run(self, level: str) -> Iterator[FluxKontextPipeline]:
        pipeline = self.pipelines[level]
        if self.cache is None or pipeline is not self.pipelines["high"]:
            yield pipeline
            return
        with self.cache.active(self.high if level == "high" else None):
            yield pipeline


def compile_blocks(
    transformer: FluxTransformer2DModel, backend: str | Callable[..., Any] = "inductor"
) -> None:
    """Compile each block's forward in place (before any cache hook wraps it, so hooks stay eager)."""
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), RECOMPILE_LIMIT))
    for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks):
        block.forward = torch.compile(block.forward, fullgraph=True, dynamic=True, backend=backend)


def _fp8_unavailable(device: str) -> str | None:
    if not device.startswith("cuda"):
        return "fp8 matmuls need a CUDA GPU"
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return "the GPU has no fp8 tensor cores (compute capability 8.9+ needed)"
    return None


def _flash3_unavailable(device: str) -> str | None:
    from diffusers.utils import is_flash_attn_3_available

    if not device.startswith("cuda"):
        return "it needs a CUDA GPU"
    if torch.cuda.get_device_capability(device)[0] != 9:
        return "it runs on Hopper GPUs (compute capability 9.x) only"
    if not is_flash_attn_3_available():
        return "flash_attn_interface (FlashAttention-3's hopper build) is not installed"
    return None


def _fuse_qkv(transformer: FluxTransformer2DModel) -> None:
    """One matmul for Q, K and V; the separate projections go, so the copy costs no extra for them."""
    transformer.fuse_qkv_projections()
    for module in transformer.modules():
        if isinstance(module, AttentionModuleMixin) and module.fused_projections:
            for name in _UNFUSED:
                if hasattr(module, name):
                    delattr(module, name)


def _fast_transformer(
    exact: FluxTransformer2DModel, device: str, applied: list[str], skipped: dict[str, str]
) -> FluxTransformer2DModel:
    fast = copy.deepcopy(exact)
    _fuse_qkv(fast)
    applied.append("fused QKV")
    reason = _fp8_unavailable(device)
    if reason is None:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        quantize_(fast, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        applied.append("fp8 dynamic quantisation")
    else:
        skipped["fp8"] = reason
    reason = _flash3_unavailable(device)
    if reason is None:
        fast.set_attention_backend("_flash_3")
        exact.set_attention_backend("native")  # pin: the call above also changed diffusers' global default
        applied.append("FlashAttention-3")
    else:
        skipped["FlashAttention-3"] = reason
    return fast


def _why_no_copy(memory: MemoryPlan, weights: str) -> str:
    if weights == "fp8":
        return "--weights fp8 keeps a single transformer"
    if memory.offload != "none":
        return f"--offload {memory.offload} keeps a single transformer"
    return "no room for a second transformer beside the exact one"


def build_levels(
    pipeline: FluxKontextPipeline,
    device: str,
    memory: MemoryPlan,
    *,
    weights: str,
    compile: bool,
    high: Policy | None = None,
    compile_backend: str | Callable[..., Any] = "inductor",
) -> Levels:
    """Prepare every level on a pipeline already placed on `device`, and log once what each adds or skips.

    `high` overrides the step cache policy (the benchmark's fixed schedule); by default a threshold.
    """
    applied: dict[str, list[str]] = {"none": [], "regular": [], "high": []}
    skipped: dict[str, str] = {}
    exact = pipeline.transformer
    fast = None
    if memory.fast_copy:
        fast = _fast_transformer(exact, device, applied["regular"], skipped)
    else:
        skipped["regular transformer (fused QKV, fp8, FlashAttention-3)"] = _why_no_copy(memory, weights)
    if compile and weights == "fp8":
        skipped["torch.compile"] = "layerwise fp8 casting hooks do not compile"
    elif compile and memory.offload == "sequential":
        skipped["torch.compile"] = "sequential offload moves weights inside every layer"
    elif compile:
        for transformer, level in ((exact, "none"), (fast, "regular")):
            if transformer is not None:
                compile_blocks(transformer, compile_backend)
                applied[level].append("torch.compile")
    if fast is None:  # regular runs the exact transformer
        applied["regular"] = list(applied["none"])
    if high is None:
        fp8 = "fp8 dynamic quantisation" in applied["regular"]
        high = Threshold(FP8_THRESHOLD if fp8 else BF16_THRESHOLD)
    applied["high"] = [*applied["regular"], f"first block cache ({high.describe()})"]
    accelerated = pipeline
    if fast is not None:
        accelerated = FluxKontextPipeline(**{**pipeline.components, "transformer": fast})
    # After compiling: the hooks then wrap the compiled block forwards and stay eager themselves.
    cache = StepCache(accelerated.transformer)
    pipelines = {"none": pipeline, "regular": accelerated, "high": accelerated}
    levels = Levels(pipelines, cache, high, applied, skipped)
    log.info("acceleration levels", extra={"device": device, "levels": applied, "skipped": skipped})
    return levels
