"""The endpoint catalogue: the app ids, what each accepts, and how a request becomes generation work."""

from dataclasses import dataclass

from pydantic import BaseModel

from kontextd.catalogue.schemas import (
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


@dataclass(frozen=True)
class GenerationParams:
    """What a backend needs from any Kontext request, whatever endpoint it came through."""

    prompt: str
    image_url: str | None
    aspect_ratio: str | None  # None: follow the input image (edits) — text-to-image always names one
    num_images: int
    seed: int | None
    guidance_scale: float
    num_inference_steps: int
    output_format: str
    sync_mode: bool
    safety_tolerance: int | None  # None where the endpoint has no such field
    enhance_prompt: bool
    acceleration: str


def generation_params(request: BaseModel) -> GenerationParams:
    fields = request.model_dump()
    aspect_ratio = fields.get("aspect_ratio")
    if "resolution_mode" in fields and fields["resolution_mode"] not in ("auto", "match_input"):
        aspect_ratio = fields["resolution_mode"]
    return GenerationParams(
        prompt=fields["prompt"],
        image_url=fields.get("image_url"),
        aspect_ratio=aspect_ratio,
        num_images=fields["num_images"],
        seed=fields["seed"],
        guidance_scale=fields["guidance_scale"],
        num_inference_steps=fields.get("num_inference_steps", DEFAULT_STEPS),
        output_format=fields["output_format"],
        sync_mode=fields["sync_mode"],
        safety_tolerance=int(fields["safety_tolerance"]) if "safety_tolerance" in fields else None,
        enhance_prompt=fields.get("enhance_prompt", False),
        acceleration=fields.get("acceleration", "none"),
    )
