"""Step caching for the `high` level: diffusers' First Block Cache, switched on per call.

Each step runs the transformer's first block; when the cache decides the step is like the last computed
one, the other 56 blocks are skipped and their cached residual is added instead. The hooks stay installed
on the transformer and pass every block through unchanged (bit for bit) unless a call turns them on, so
`regular` calls can share the transformer `high` calls use.

Two policies: `Threshold`, diffusers' rule (reuse while the first block's residual changed less than the
threshold, relative to the last computed step), for real weights; and `FixedSchedule` (compute every
n-th step, reuse in between), for timing with random weights, whose residuals make the rule meaningless.

FluxKontextPipeline (diffusers 0.42) does not open a cache context around its transformer calls, which
the hooks need (plain `transformer.enable_cache(...)` fails there), so `active()` opens one per call.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel
from diffusers.hooks import HookRegistry
from diffusers.hooks.first_block_cache import (
    FBCBlockHook,
    FBCHeadBlockHook,
    FBCSharedBlockState,
)
from diffusers.hooks.hooks import StateManager

_HEAD_HOOK = "kontextd_step_cache_head"
_BLOCK_HOOK = "kontextd_step_cache_block"


@dataclass(frozen=True)
class Threshold:
    value: float

    def describe(self) -> str:
        return f"threshold {self.value}"


@dataclass(frozen=True)
class FixedSchedule:
    compute_every: int = 2  # compute steps 0, n, 2n, …; reuse the cached residual in between

    def describe(self) -> str:
        return f"compute every {self.compute_every} steps"


Policy = Threshold | FixedSchedule


class _HeadHook(FBCHeadBlockHook):
    """diffusers' head-block hook, deciding by the policy of the current call (None: compute every step)."""

    def __init__(self, state_manager: StateManager) -> None:
        super().__init__(state_manager, threshold=0.0)
        self.policy: Policy | None = None
        self.calls = 0  # transformer calls since the last reset: one per denoising step

    @torch.compiler.disable
    def _should_compute_remaining_blocks(self, hidden_states_residual: torch.Tensor) -> bool:
        call = self.calls
        self.calls += 1
        if self.policy is None:
            return True
        if isinstance(self.policy, FixedSchedule):
            return call % self.policy.compute_every == 0
        self.threshold = self.policy.value
        return super()._should_compute_remaining_blocks(hidden_states_residual)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.calls = 0
        return super().reset_state(module)


class StepCache:
    """First Block Cache hooks on one Flux transformer, inactive until `active(policy)`."""

    def __init__(self, transformer: FluxTransformer2DModel) -> None:
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        state = StateManager(FBCSharedBlockState)
        self._transformer = transformer
        self._head = _HeadHook(state)
        HookRegistry.check_if_exists_or_initialize(blocks[0]).register_hook(self._head, _HEAD_HOOK)
        for index, block in enumerate(blocks[1:], start=1):
            hook = FBCBlockHook(state, is_tail=index == len(blocks) - 1)
            HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, _BLOCK_HOOK)
        HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()

    @contextmanager
    def active(self, policy: Policy | None) -> Iterator[None]:
        """One pipeline call with `policy` (None: pass-through); state never leaks into the next call."""
        self._head.policy = policy
        try:
            with self._transformer.cache_context("cond"):
                yield
        finally:
            self._head.policy = None
            self._transformer._reset_stateful_cache()  # a cancelled call never reached the pipeline's reset
