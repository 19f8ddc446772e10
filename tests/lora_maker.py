"""LoRAs for the tiny model, made with peft in the test run: real adapters whose effect is seen."""

import tempfile
from pathlib import Path

import torch
from diffusers import FluxKontextPipeline
from peft import LoraConfig, get_peft_model_state_dict

from kontextd.backends.tiny import build_tiny_pipeline


def make_lora(seed: int, rank: int = 4) -> bytes:
    """A real LoRA for the tiny model: peft adapters with random (non-zero) weights, saved by diffusers."""
    pipeline = build_tiny_pipeline()
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False
    )
    pipeline.transformer.add_adapter(config)
    state = get_peft_model_state_dict(pipeline.transformer)
    with tempfile.TemporaryDirectory() as folder:
        FluxKontextPipeline.save_lora_weights(folder, transformer_lora_layers=state)
        return (Path(folder) / "pytorch_lora_weights.safetensors").read_bytes()
