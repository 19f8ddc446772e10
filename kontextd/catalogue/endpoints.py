"""The endpoint catalogue: the app ids, what each accepts, and how a request becomes generation work."""

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image
from pydantic import BaseModel

from kontextd.backends.base import GenerationJob, ImageInput, LoraWeight
from kontextd.catalogue.schemas import (
    ASPECT_RATIOS,
    SEED_MAX,
    DevEditInput,
    ImageDimensions,
    LoraEditInput,
    LoraInpaintInput,
    LoraTextToImageInput,
    MaxEditInput,
    ProEditInput,
    ProMultiEditInput,
    ProTextToImageInput,
    nearest_ratio,
)

DEFAULT_STEPS = 28


@dataclass(frozen=True)
class Endpoint:
    app_id: str
    title: str
    description: str
    input_model: type[BaseModel]
    family: str  # "pro", "max" or "dev": which FLUX.1 Kontext model the endpoint stands for


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "fal-ai/flux-pro/kontext/text-to-image",
        "FLUX.1 Kontext [pro] text to image",
        "Generate images from a text prompt with FLUX.1 Kontext [pro].",
        ProTextToImageInput,
        "pro",
    ),
    Endpoint(
        "fal-ai/flux-pro/kontext",
        "FLUX.1 Kontext [pro] edit",
        "Edit an image from a text instruction with FLUX.1 Kontext [pro].",
        ProEditInput,
        "pro",
    ),
    Endpoint(
        "fal-ai/flux-pro/kontext/max/text-to-image",
        "FLUX.1 Kontext [max] text to image",
        "Generate images from a text prompt with FLUX.1 Kontext [max], the strongest prompt adherence.",
        ProTextToImageInput,
        "max",
    ),
    Endpoint(
        "fal-ai/flux-pro/kontext/max",
        "FLUX.1 Kontext [max] edit",
        "Edit an image from a text instruction with FLUX.1 Kontext [max].",
        MaxEditInput,
        "max",
    ),
    Endpoint(
        "fal-ai/flux-pro/kontext/multi",
        "FLUX.1 Kontext [pro] multi-image edit",
        "Edit and combine up to four images from a text instruction with FLUX.1 Kontext [pro].",
        ProMultiEditInput,
        "pro",
    ),
    Endpoint(
        "fal-ai/flux-pro/kontext/max/multi",
        "FLUX.1 Kontext [max] multi-image edit",
        "Edit and combine up to four images from a text instruction with FLUX.1 Kontext [max].",
        ProMultiEditInput,
        "max",
    ),
    Endpoint(
        "fal-ai/flux-kontext/dev",
        "FLUX.1 Kontext [dev] edit",
        "Edit an image with the open-weights FLUX.1 Kontext [dev] model.",
        DevEditInput,
        "dev",
    ),
    Endpoint(
        "fal-ai/flux-kontext-lora",
        "FLUX.1 Kontext [dev] edit with LoRAs",
        "Edit an image with FLUX.1 Kontext [dev] and up to four LoRAs (URLs, Hugging Face repos or the "
        "operator's own).",
        LoraEditInput,
        "dev",
    ),
    Endpoint(
        "fal-ai/flux-kontext-lora/text-to-image",
        "FLUX.1 Kontext [dev] text to image with LoRAs",
        "Generate images from a text prompt with FLUX.1 Kontext [dev] and up to four LoRAs.",
        LoraTextToImageInput,
        "dev",
    ),
    Endpoint(
        "fal-ai/flux-kontext-lora/inpaint",
        "FLUX.1 Kontext [dev] inpainting with LoRAs",
        "Repaint the masked part of an image after a reference image with FLUX.1 Kontext [dev] and LoRAs.",
        LoraInpaintInput,
        "dev",
    ),
)

BY_APP_ID: dict[str, Endpoint] = {endpoint.app_id: endpoint for endpoint in ENDPOINTS}

RUNNER_HINT_PATTERN = r"^[!-~]{0,256}$"  # X-Fal-Runner-Hint: visible ASCII, safe in any log line; empty: none


def affinity(request: BaseModel, runner_hint: str | None) -> str | None:
    """What a worker that ran such a request before is preferred for (JobStore.claim's `prefer`): the
    client's runner hint, else the set of LoRAs it names, so it goes where they are loaded. None: any."""
    if runner_hint:
        return f"hint:{runner_hint}"
    paths = sorted({lora.path for lora in getattr(request, "loras", None) or []})
    if not paths:
        return None
    return "loras:" + hashlib.sha256("\n".join(paths).encode()).hexdigest()[:32]


def generation_job(
    request: BaseModel, load_image: Callable[[str], Image.Image], model: str | None = None
) -> GenerationJob:
    """The one shape of a request from here to the backend, built from an endpoint's validated input.

    The endpoint's own spellings become common ones (one `image_url` or up to four `image_urls` are the
    images, [dev]'s fixed `resolution_mode` is an aspect ratio, fal's string `safety_tolerance` a number),
    images are decoded only if a backend asks (`load_image`), and a request naming no seed gets a random
    one, so the output can report the seed that was used.
    `model` is the routed model, for backends serving several.
    """
    fields = request.model_dump()
    seed = fields["seed"]
    return GenerationJob(
        prompt=fields["prompt"],
        images=_images(fields, load_image),
        aspect_ratio=_aspect_ratio(fields),
        num_images=fields["num_images"],
        seed=seed if seed is not None else secrets.randbelow(SEED_MAX + 1),
        guidance_scale=fields["guidance_scale"],
        num_inference_steps=fields.get("num_inference_steps", DEFAULT_STEPS),
        output_format=fields["output_format"],
        sync_mode=fields["sync_mode"],
        safety_tolerance=int(fields["safety_tolerance"]) if "safety_tolerance" in fields else None,
        enable_safety_checker=fields.get("enable_safety_checker", True),
        enhance_prompt=fields.get("enhance_prompt", False),
        acceleration=fields.get("acceleration", "none"),
        model=model,
        loras=tuple(LoraWeight(each["path"], each["scale"]) for each in fields.get("loras", [])),
        mask=ImageInput(fields["mask_url"], load_image, ("mask_url",)) if "mask_url" in fields else None,
        strength=fields.get("strength", 1.0),
    )


def _aspect_ratio(fields: dict[str, Any]) -> str | None:
    """The shape asked for, in the endpoint's spelling: `aspect_ratio`, [dev]'s fixed `resolution_mode`, or
    (LoRA text-to-image, which has neither) `image_size`. None: follow the input image."""
    if "resolution_mode" in fields:
        mode = fields["resolution_mode"]
        return None if mode in ("auto", "match_input") else mode
    if "aspect_ratio" in fields:
        return fields["aspect_ratio"]
    size = fields.get("image_size")
    if size is None:
        return None
    return nearest_ratio(size if isinstance(size, str) else ImageDimensions(**size), ASPECT_RATIOS)


def _images(fields: dict[str, Any], load_image: Callable[[str], Image.Image]) -> tuple[ImageInput, ...]:
    """The request's input images in its order, each knowing its field for the error a client reads."""
    if fields.get("image_urls") is not None:
        urls = fields["image_urls"]
        return tuple(ImageInput(url, load_image, ("image_urls", index)) for index, url in enumerate(urls))
    images = [
        ImageInput(fields[name], load_image, (name,))
        for name in ("image_url", "reference_image_url")  # inpainting's reference follows the image
        if fields.get(name) is not None
    ]
    return tuple(images)
