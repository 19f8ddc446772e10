"""The endpoint catalogue: the app ids, what each accepts, and how a request becomes generation work."""

import secrets
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image
from pydantic import BaseModel

from kontextd.backends.base import GenerationJob, ImageInput
from kontextd.catalogue.schemas import (
    SEED_MAX,
    DevEditInput,
    MaxEditInput,
    ProEditInput,
    ProTextToImageInput,
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
        "fal-ai/flux-kontext/dev",
        "FLUX.1 Kontext [dev] edit",
        "Edit an image with the open-weights FLUX.1 Kontext [dev] model.",
        DevEditInput,
        "dev",
    ),
)

BY_APP_ID: dict[str, Endpoint] = {endpoint.app_id: endpoint for endpoint in ENDPOINTS}


def generation_job(
    request: BaseModel, load_image: Callable[[str], Image.Image], model: str | None = None
) -> GenerationJob:
    """The one shape of a request from here to the backend, built from an endpoint's validated input.

    The endpoint's own spellings become common ones ([dev]'s fixed `resolution_mode` is an aspect ratio,
    fal's string `safety_tolerance` a number), the image is decoded only if a backend asks (`load_image`),
    and a request naming no seed gets a random one, so the output can report the seed that was used.
    `model` is the routed model, for backends serving several.
    """
    fields = request.model_dump()
    aspect_ratio = fields.get("aspect_ratio")
    if "resolution_mode" in fields and fields["resolution_mode"] not in ("auto", "match_input"):
        aspect_ratio = fields["resolution_mode"]
    image_url, seed = fields.get("image_url"), fields["seed"]
    return GenerationJob(
        prompt=fields["prompt"],
        image=ImageInput(image_url, load_image) if image_url is not None else None,
        aspect_ratio=aspect_ratio,
        num_images=fields["num_images"],
        seed=seed if seed is not None else secrets.randbelow(SEED_MAX + 1),
        guidance_scale=fields["guidance_scale"],
        num_inference_steps=fields.get("num_inference_steps", DEFAULT_STEPS),
        output_format=fields["output_format"],
        sync_mode=fields["sync_mode"],
        safety_tolerance=int(fields["safety_tolerance"]) if "safety_tolerance" in fields else None,
        enhance_prompt=fields.get("enhance_prompt", False),
        acceleration=fields.get("acceleration", "none"),
        model=model,
    )
