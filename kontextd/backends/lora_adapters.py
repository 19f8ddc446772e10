"""LoRAs switched on one pipeline between requests, through diffusers' LoRA API (peft).

Each LoRA file becomes one named adapter on the transformer, named by its content hash, and stays loaded
(up to MAX_LOADED, the least recently used unloaded beyond that): a request's set is switched on with
`set_adapters` at its scales, without reloading the base model or the adapters it shares with the
request before. A request that names no LoRA runs with every adapter disabled, which peft implements as
the base layer's own forward: its image is byte-identical to one made before any LoRA was loaded.

A file that is no LoRA, or one made for another model, fails to load; what a failed load left behind is
removed, and the request ends with a 422 that names the LoRA, while the worker goes on.
"""

import logging
from collections import OrderedDict
from collections.abc import Sequence

from diffusers import FluxKontextPipeline

from kontextd.backends.base import InputUnusable, LoraWeight
from kontextd.backends.lora_files import ERROR_TYPE, LoraFile, LoraFiles

log = logging.getLogger("kontextd.loras")

MAX_LOADED = 8  # adapters kept on the transformer; each costs its own weights in device memory


class LoraAdapters:
    """The adapters loaded on one worker's pipeline. Not thread-safe: one worker runs one request at a
    time on its pipeline, and so does this."""

    def __init__(self, pipeline: FluxKontextPipeline, files: LoraFiles) -> None:
        self._pipeline = pipeline
        self._files = files
        self._loaded: OrderedDict[str, None] = OrderedDict()  # adapter names, least recently used first
        self._enabled = False

    @property
    def loaded(self) -> frozenset[str]:
        """The content hashes of the LoRAs loaded now (what makes this worker the one to prefer)."""
        return frozenset(name.removeprefix("lora_") for name in self._loaded)

    def use(self, loras: Sequence[LoraWeight]) -> None:
        """Make the pipeline apply exactly `loras`, each at its scale (none: the base model)."""
        if not loras:
            if self._enabled:
                self._pipeline.disable_lora()
                self._enabled = False
            return
        scales: dict[str, float] = {}
        for index, lora in enumerate(loras):
            field = ("loras", index, "path")
            name = self._load(self._files.resolve(lora.path, field), lora.path, field)
            scales[name] = scales.get(name, 0.0) + lora.scale  # one file named twice: its scales add
        self._pipeline.enable_lora()
        self._pipeline.set_adapters(list(scales), list(scales.values()))
        self._enabled = True
        self._unload_beyond(MAX_LOADED, keep=set(scales))

    def _load(self, file: LoraFile, path: str, field: tuple[str | int, ...]) -> str:
        name = f"lora_{file.digest[:32]}"
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return name
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(file.path))
            self._pipeline.load_lora_weights(state, adapter_name=name)
        except (SafetensorError, ValueError, RuntimeError, KeyError) as error:
            self._forget(name)
            reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            raise InputUnusable(field, path, ERROR_TYPE, f"not a LoRA for this model: {reason}") from None
        if name not in self._adapters():
            # diffusers loads a LoRA whose layer names match nothing as no adapter at all, with a warning.
            raise InputUnusable(field, path, ERROR_TYPE, "not a LoRA for this model: it matches no layer")
        self._loaded[name] = None
        log.info("lora loaded", extra={"digest": file.digest[:16], "loaded": len(self._loaded)})
        return name

    def _adapters(self) -> set[str]:
        return {name for names in self._pipeline.get_list_adapters().values() for name in names}

    def _forget(self, name: str) -> None:
        """Remove what a failed load may have left: the pipeline must look as it did before."""
        if name in self._adapters():
            self._pipeline.delete_adapters([name])

    def _unload_beyond(self, limit: int, keep: set[str]) -> None:
        for name in list(self._loaded):
            if len(self._loaded) <= limit:
                break
            if name in keep:
                continue
            self._pipeline.delete_adapters([name])
            del self._loaded[name]
            log.info("lora unloaded", extra={"digest": name.removeprefix("lora_")[:16]})
