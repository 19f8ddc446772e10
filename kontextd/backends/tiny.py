"""FLUX.1 Kontext pipelines with random weights: tiny ones for offline tests, full-size ones for benchmarks.

It is the real ``diffusers.FluxKontextPipeline`` class, so every code path the server uses with the real
weights (prompt encoding, VAE encode/decode, packing, scheduling, callbacks, save/load) runs unchanged;
only the component sizes differ. Built in code, with no files and no network access.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxTransformer2DModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

# The tiny model renders the Kontext resolution table divided by this (1024x1024 -> 128x128).
TINY_RESOLUTION_SCALE: int = 8

# Text width shared by both encoders and the transformer: T5's d_model must equal the transformer's
# joint_attention_dim, and CLIP's pooled output (hidden_size wide) must equal pooled_projection_dim.
_TEXT_DIM = 32
_CLIP_MAX_LENGTH = 77
_T5_MAX_LENGTH = 512


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins the ByteLevel pre-tokenizer maps every byte to."""
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _byte_tokenizer(
    vocab: dict[str, int], *, bos: str | None, eos: str, model_max_length: int, **special: str
) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: one token per UTF-8 byte, so any text encodes and distinct texts differ.

    A BPE model with no merges never joins bytes; every id is < len(vocab).
    """
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    single = ([bos] if bos else []) + ["$A", eos]
    backend.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(tok, vocab[tok]) for tok in single if tok != "$A"]
    )
    if bos:
        special["bos_token"] = bos
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos, model_max_length=model_max_length, **special
    )


def _clip_tokenizer() -> PreTrainedTokenizerFast:
    # Bytes first, then BOS, then EOS with the highest id: CLIP pools at argmax(input_ids) when its config
    # says eos_token_id == 2 (the real CLIP-L config does), and at the first EOS otherwise; with EOS the
    # largest id and padding done with EOS (as CLIP-L's tokenizer does) both rules pick the same position.
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return _byte_tokenizer(
        vocab,
        bos="<|startoftext|>",
        eos="<|endoftext|>",
        model_max_length=_CLIP_MAX_LENGTH,
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def _t5_tokenizer() -> PreTrainedTokenizerFast:
    # T5's layout: <pad>=0, </s>=1, <unk>=2, then the pieces; no BOS, EOS appended.
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(_byte_alphabet())})
    return _byte_tokenizer(
        vocab, bos=None, eos="</s>", model_max_length=_T5_MAX_LENGTH, pad_token="<pad>", unk_token="<unk>"
    )


@dataclass(frozen=True)
class Architecture:
    """Component shapes of a FLUX.1 Kontext pipeline: constructor arguments of each model."""

    transformer: dict[str, Any]
    clip: dict[str, Any]
    t5: dict[str, Any]
    vae_blocks: tuple[int, ...]
    vae_layers_per_block: int
    vae_norm_groups: int
    vae_mid_attention: bool


# Tiny: a few thousand parameters, for tests and the CPU. Text width 32 is shared by both encoders and
# the transformer (T5's d_model is its joint_attention_dim; CLIP's pooled width its pooled_projection_dim).
TINY = Architecture(
    transformer={
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": _TEXT_DIM,
        "pooled_projection_dim": _TEXT_DIM,
        "axes_dims_rope": (4, 4, 8),
    },
    clip={
        "hidden_size": _TEXT_DIM,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "projection_dim": _TEXT_DIM,
    },
    t5={
        "d_model": _TEXT_DIM,
        "d_kv": 8,
        "d_ff": 37,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
    },
    vae_blocks=(8, 8, 8, 8),
    vae_layers_per_block=1,
    vae_norm_groups=4,
    vae_mid_attention=False,  # attention over every pixel would crawl on a CPU at real sizes
)

# FLUX.1 Kontext [dev] at full size (11.9 B transformer, T5-XXL, CLIP-L): for benchmarks, which time
# the real shapes without the (gated) weights.
FULL = Architecture(
    transformer={
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "axes_dims_rope": (16, 56, 56),
    },
    clip={
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "projection_dim": 768,
    },
    t5={
        "d_model": 4096,
        "d_kv": 64,
        "d_ff": 10240,
        "num_layers": 24,
        "num_heads": 64,
        "relative_attention_num_buckets": 32,
    },
    vae_blocks=(128, 256, 512, 512),
    vae_layers_per_block=2,
    vae_norm_groups=32,
    vae_mid_attention=True,
)


def build_tiny_pipeline(seed: int = 0) -> FluxKontextPipeline:
    """Build a tiny float32 CPU FluxKontextPipeline whose weights depend only on ``seed``."""
    return build_random_pipeline(TINY, seed=seed)


def build_random_pipeline(
    architecture: Architecture, *, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> FluxKontextPipeline:
    """The real pipeline class with random weights of the given shapes, created directly on `device`."""
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()

    # Seed inside a forked RNG so the caller's global torch RNG state is left as it was. Creating the
    # modules on the device in the target dtype keeps a 12 B-parameter model from passing through host RAM.
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=len(tokenizer),
                    max_position_embeddings=_CLIP_MAX_LENGTH,
                    hidden_act="quick_gelu",
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                    **architecture.clip,
                )
            )
            text_encoder_2 = T5EncoderModel(
                T5Config(
                    vocab_size=len(tokenizer_2),
                    feed_forward_proj="gated-gelu",
                    pad_token_id=tokenizer_2.pad_token_id,
                    eos_token_id=tokenizer_2.eos_token_id,
                    decoder_start_token_id=tokenizer_2.pad_token_id,
                    **architecture.t5,
                )
            )
            # Four blocks make vae_scale_factor 8 and 16 latent channels make the transformer's packed
            # input 64 wide, as in the real model, so real resolutions and latent geometry work unchanged.
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=architecture.vae_blocks,
                layers_per_block=architecture.vae_layers_per_block,
                latent_channels=16,
                norm_num_groups=architecture.vae_norm_groups,
                mid_block_add_attention=architecture.vae_mid_attention,
                use_quant_conv=False,
                use_post_quant_conv=False,
                shift_factor=0.1159,
                scaling_factor=0.3611,
            )
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=64, guidance_embeds=True, **architecture.transformer
            )
    finally:
        torch.set_default_dtype(previous_dtype)

    # FLUX.1 Kontext [dev]'s scheduler config.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    # Built modules start in training mode (T5 would apply dropout); from_pretrained returns them in eval
    # mode, so match it for deterministic outputs identical to a saved and reloaded copy.
    for module in (text_encoder, text_encoder_2, vae, transformer):
        module.eval()
    return FluxKontextPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
