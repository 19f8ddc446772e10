"""Request and response models of the FLUX.1 Kontext endpoints, as fal and the seed documents define them."""

from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

AspectRatio = Literal["21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21"]
SafetyTolerance = Literal["1", "2", "3", "4", "5", "6"]
OutputFormat = Literal["jpeg", "png"]
Acceleration = Literal["none", "regular", "high"]
ResolutionMode = Literal[
    "auto", "match_input", "1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"
]

Prompt = Annotated[
    str,
    Field(
        min_length=1,
        description="The prompt to generate an image from.",
        examples=["A cat looking down at the Earth from inside a spaceship"],
    ),
]
Seed = Annotated[
    int | None,
    Field(
        description="The same seed and the same prompt given to the same version of the model will output "
        "the same image every time.",
    ),
]
NumImages = Annotated[int, Field(ge=1, le=4, description="The number of images to generate (1 to 4).")]
SyncMode = Annotated[
    bool,
    Field(
        description="If true, the images are returned inline as data URIs and are not stored. The response "
        "waits for the image (higher latency).",
    ),
]
ImageUrl = Annotated[
    str,
    Field(
        description="Image to edit: an https/http URL or a data: URI. At most 14142x14142 pixels.",
        examples=["https://v3.fal.media/files/rabbit/rmgBxhwGYb2d3pl3x9sKf_output.png"],
    ),
]


class _KontextInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: Prompt
    seed: Seed = None
    num_images: NumImages = 1
    sync_mode: SyncMode = False


class _ProFields(_KontextInput):
    guidance_scale: float = Field(
        3.5,
        ge=1,
        le=20,
        description="Classifier-free guidance: how closely the image follows the prompt (1 to 20).",
    )
    safety_tolerance: SafetyTolerance = Field(
        "2",
        description="The safety tolerance level for the generated image. "
        "1 is the most strict, 6 the most permissive.",
    )
    output_format: OutputFormat = Field("jpeg", description="The format of the generated image.")
    enhance_prompt: bool = Field(False, description="Whether to enhance the prompt for better results.")


def _check_image_url(value: str) -> str:
    # PydanticCustomError rather than ValueError: the 422 then carries a clean message and no opaque ctx.
    if value.startswith(("https://", "http://")):
        if not urlsplit(value).hostname:
            raise PydanticCustomError("url_parsing", "URL has no host")
        return value
    if value.startswith("data:"):
        if ";base64," not in value[:200]:
            raise PydanticCustomError(
                "value_error", "data URI must be base64-encoded (data:image/...;base64,...)"
            )
        return value
    raise PydanticCustomError("value_error", "must be an https:// or http:// URL or a data: URI")


class ProTextToImageInput(_ProFields):
    aspect_ratio: AspectRatio = Field("1:1", description="The aspect ratio of the generated image.")


class ProEditInput(_ProFields):
    image_url: ImageUrl
    aspect_ratio: AspectRatio | None = Field(
        None, description="The aspect ratio of the generated image. Absent: follow the input image."
    )

    _image_url = field_validator("image_url")(_check_image_url)


class MaxEditInput(ProEditInput):
    # Seed 003 lists output_format as required for this endpoint.
    output_format: OutputFormat = Field(..., description="The format of the generated image: jpeg or png.")


class DevEditInput(_KontextInput):
    image_url: ImageUrl
    num_inference_steps: int = Field(
        28, ge=10, le=50, description="The number of denoising steps (10 to 50)."
    )
    guidance_scale: float = Field(
        2.5, ge=1, le=20, description="Classifier-free guidance: how closely the image follows the prompt."
    )
    enable_safety_checker: bool = Field(True, description="If set to true, the safety checker is enabled.")
    output_format: OutputFormat = Field("jpeg", description="The format of the generated image.")
    acceleration: Acceleration = Field(
        "none", description="The speed of the generation: none (exact), regular or high (faster, lossy)."
    )
    resolution_mode: ResolutionMode = Field(
        "match_input",
        description="Output resolution: match_input follows the input image, auto lets the model choose, "
        "or a fixed aspect ratio.",
    )

    _image_url = field_validator("image_url")(_check_image_url)


class Image(BaseModel):
    url: str = Field(description="Where to get the image: a URL, or a data: URI in sync mode.")
    width: int
    height: int
    content_type: str = Field(examples=["image/jpeg"])


class KontextOutput(BaseModel):
    images: list[Image] = Field(description="The generated images.")
    timings: dict[str, float] = Field(description="Seconds spent per stage, e.g. inference.")
    seed: int = Field(description="The seed used; the same seed and inputs reproduce these images.")
    has_nsfw_concepts: list[bool] = Field(description="Whether each image was flagged by the safety checker.")
    prompt: str = Field(description="The prompt used for generating the images.")


class QueueEnvelope(BaseModel):
    status: Literal["IN_QUEUE"]
    request_id: str
    gateway_request_id: str
    response_url: str
    status_url: str
    cancel_url: str
    queue_position: int
    logs: None = None
    metrics: dict[str, float] = Field(default_factory=dict)
