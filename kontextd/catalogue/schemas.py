"""Request and response models of the FLUX.1 Kontext endpoints, as fal and the seed documents define them."""

import math
import re
from typing import Annotated, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

AspectRatio = Literal["21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21"]
SafetyTolerance = Literal["1", "2", "3", "4", "5", "6"]
OutputFormat = Literal["jpeg", "png"]
Acceleration = Literal["none", "regular", "high"]
ResolutionMode = Literal[
    "auto", "match_input", "1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"
]

PROMPT_MAX_CHARS = 4000  # T5 reads 512 tokens (about 2,000 characters of English); the rest is never seen
SEED_MAX = 2**32 - 1  # what every backend can reproduce: torch generators locally, BFL's and fal's seeds
URL_MAX_CHARS = 8192  # an image URL, signed query included; data URIs are bounded by the body size instead
EXAMPLE_IMAGE = (  # a 1x1 PNG: examples work offline and never send the server to the internet
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4//8/AAX+Av4N70a4AAAAAElFTkSuQmCC"
)


# An http(s) URL with a plain host name or a bracketed IPv6 literal. No `$`: it means "end, or before a
# final newline" in Python and "end" in JSON Schema's regex dialect; the lookahead means the same in both.
HTTP_URL_PATTERN = r"https?://([A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?(?![^/?#])"
# What image_url takes: such a URL, or a base64 data URI.
IMAGE_URL_PATTERN = rf"^({HTTP_URL_PATTERN}|data:[^,]{{0,190}};base64,)"
_IMAGE_URL = re.compile(IMAGE_URL_PATTERN)


# A character that is not whitespace, spelt out so Python and JSON Schema's regex dialect (ECMA-262) agree:
# their `\S` differ (Python counts U+001C-U+001F and U+0085 as space, ECMA counts U+FEFF).
NOT_BLANK_PATTERN = r"[^\t\n\x0b\x0c\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
_NOT_BLANK = re.compile(NOT_BLANK_PATTERN)


def _has_text(value: str) -> str:
    if not _NOT_BLANK.search(value):
        raise PydanticCustomError("string_blank", "Prompt must contain more than whitespace")
    return value


Prompt = Annotated[
    str,
    Field(
        min_length=1,
        max_length=PROMPT_MAX_CHARS,
        description=f"The prompt to generate an image from (at most {PROMPT_MAX_CHARS} characters).",
        examples=["A cat looking down at the Earth from inside a spaceship"],
        json_schema_extra={"pattern": NOT_BLANK_PATTERN},  # documents _has_text: more than whitespace
    ),
    AfterValidator(_has_text),
]


def _integral(value: object) -> object:
    """JSON has one number type: 3.0 is the integer 3 (as JSON Schema says too), 3.5 is none."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PydanticCustomError("finite_number", "Input should be a finite number")
        if not value.is_integer():
            raise PydanticCustomError(
                "int_from_float", "Input should be a valid integer, got a number with a fractional part"
            )
        return int(value)
    return value


# Integer fields: with the models' strict mode, "3" and true are refused, and 3.0 is taken as 3.
Integer = BeforeValidator(_integral)

Seed = Annotated[
    Annotated[int, Field(ge=0, le=SEED_MAX), Integer] | None,
    Field(
        description="The same seed and the same prompt given to the same version of the model will output "
        f"the same image every time: 0 to {SEED_MAX}. Absent: a random seed, reported in the output.",
    ),
]
NumImages = Annotated[
    int, Field(ge=1, le=4, description="The number of images to generate (1 to 4)."), Integer
]
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
        description="Image to edit: an https/http URL or a data: URI. At most 14142 pixels a side.",
        examples=[EXAMPLE_IMAGE],
        # Documents _check_image_url for generated clients and contract tests: the checks stay there.
        json_schema_extra={"pattern": IMAGE_URL_PATTERN},
    ),
]


# fal's image_size presets, each an aspect ratio (its pixels are fal's; Kontext makes about one megapixel
# whatever the preset, so only the shape counts).
IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1, 1),
    "square": (1, 1),
    "portrait_4_3": (3, 4),
    "portrait_16_9": (9, 16),
    "landscape_4_3": (4, 3),
    "landscape_16_9": (16, 9),
}
ImageSizePreset = Literal[
    "square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"
]
# The published enum and the shapes name the same presets: a preset accepted without a shape would be a 500.
assert set(get_args(ImageSizePreset)) == set(IMAGE_SIZE_PRESETS)


class ImageDimensions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    width: Annotated[int, Integer] = Field(ge=1, le=14142, description="Pixels across (1 to 14142).")
    height: Annotated[int, Integer] = Field(ge=1, le=14142, description="Pixels down (1 to 14142).")


ImageSize = Annotated[
    ImageSizePreset | ImageDimensions | None,
    Field(
        description="What the AI SDK and fal's other apps send for the shape: a preset or {width, height}. "
        "Taken as the nearest aspect ratio when no aspect ratio is given; an aspect ratio given wins.",
    ),
]


def nearest_ratio(size: str | ImageDimensions, choices: tuple[str, ...]) -> str:
    """The choice ("W:H") nearest in shape to an image_size: the smallest difference of log aspect ratios, so
    2:1 is as far from 1:1 as 1:2 is."""
    width, height = IMAGE_SIZE_PRESETS[size] if isinstance(size, str) else (size.width, size.height)

    def distance(choice: str) -> float:
        across, down = choice.split(":")
        return abs(math.log(int(across) / int(down)) - math.log(width / height))

    return min(choices, key=distance)


ASPECT_RATIOS: tuple[str, ...] = get_args(AspectRatio)
RESOLUTION_RATIOS = tuple(mode for mode in get_args(ResolutionMode) if ":" in mode)


class _KontextInput(BaseModel):
    # Strict: a field takes only its JSON type, as the OpenAPI document says ("true" is no boolean, "3" no
    # number). NaN and infinity are no numbers a client means: refused like any value out of range.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

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
        description="The safety tolerance level for the generated image: 1 is the most strict, 6 the most "
        "permissive. Sent on to BFL or fal where they serve the endpoint; on the local model, the score at "
        "which the server's safety checker flags an image (a flagged image comes back black, marked in "
        "has_nsfw_concepts). No level turns the checker off.",
    )
    output_format: OutputFormat = Field("jpeg", description="The format of the generated image.")
    enhance_prompt: bool = Field(False, description="Whether to enhance the prompt for better results.")


def _check_image_url(value: str) -> str:
    # PydanticCustomError rather than ValueError: the 422 then carries a clean message and no opaque ctx.
    # The grammar is IMAGE_URL_PATTERN, which the OpenAPI document publishes: the two never disagree.
    well_formed = _IMAGE_URL.match(value) is not None
    if value.startswith(("https://", "http://")):
        if len(value) > URL_MAX_CHARS:
            raise PydanticCustomError(
                "url_too_long", "URL longer than {max_length} characters", {"max_length": URL_MAX_CHARS}
            )
        if not well_formed:
            raise PydanticCustomError("url_parsing", "URL has no valid host")
        return value
    if value.startswith("data:"):
        if not well_formed:
            raise PydanticCustomError(
                "value_error", "data URI must be base64-encoded (data:image/...;base64,...)"
            )
        return value
    raise PydanticCustomError("value_error", "must be an https:// or http:// URL or a data: URI")


class _ShapedByImageSize(_ProFields):
    image_size: ImageSize = None

    @model_validator(mode="after")
    def _aspect_ratio_from_image_size(self) -> "_ShapedByImageSize":
        if self.image_size is not None and "aspect_ratio" not in self.model_fields_set:
            self.aspect_ratio = nearest_ratio(self.image_size, ASPECT_RATIOS)  # type: ignore[attr-defined]
        return self


class ProTextToImageInput(_ShapedByImageSize):
    aspect_ratio: AspectRatio = Field("1:1", description="The aspect ratio of the generated image.")


class ProEditInput(_ShapedByImageSize):
    image_url: ImageUrl
    aspect_ratio: AspectRatio | None = Field(
        None, description="The aspect ratio of the generated image. Absent: follow the input image."
    )

    _image_url = field_validator("image_url")(_check_image_url)


MAX_REFERENCE_IMAGES = 4  # BFL takes input_image … input_image_4; fal documents no maximum

ImageUrls = Annotated[
    list[Annotated[ImageUrl, AfterValidator(_check_image_url)]],
    Field(
        min_length=1,
        max_length=MAX_REFERENCE_IMAGES,
        description=f"The images to edit together (1 to {MAX_REFERENCE_IMAGES}): https/http URLs or data: "
        "URIs, each at most 14142 pixels a side. The output follows the first unless aspect_ratio is given.",
        examples=[[EXAMPLE_IMAGE, EXAMPLE_IMAGE]],
    ),
]


class ProMultiEditInput(_ShapedByImageSize):
    image_urls: ImageUrls
    aspect_ratio: AspectRatio | None = Field(
        None, description="The aspect ratio of the generated image. Absent: follow the first input image."
    )


class MaxEditInput(ProEditInput):
    # Seed 003 lists output_format as required for this endpoint.
    output_format: OutputFormat = Field(..., description="The format of the generated image: jpeg or png.")


class _ResolutionModes(_KontextInput):
    """[dev]'s way of choosing the output's shape, also the LoRA edit endpoint's."""

    resolution_mode: ResolutionMode = Field(
        "match_input",
        description="Output resolution: match_input follows the input image, auto lets the model choose, "
        "or a fixed aspect ratio.",
    )
    image_size: ImageSize = None

    @model_validator(mode="after")
    def _resolution_from_image_size(self) -> "_ResolutionModes":
        if self.image_size is not None and "resolution_mode" not in self.model_fields_set:
            self.resolution_mode = nearest_ratio(self.image_size, RESOLUTION_RATIOS)  # type: ignore[assignment]
        return self


class DevEditInput(_ResolutionModes):
    image_url: ImageUrl
    num_inference_steps: Annotated[int, Integer] = Field(
        28, ge=10, le=50, description="The number of denoising steps (10 to 50)."
    )
    guidance_scale: float = Field(
        2.5, ge=1, le=20, description="Classifier-free guidance: how closely the image follows the prompt."
    )
    enable_safety_checker: bool = Field(
        True,
        description="If true, each image is checked by the safety checker (at safety tolerance 2): a flagged "
        "image comes back black, of the same size, marked in has_nsfw_concepts. False: returned unchecked.",
    )
    output_format: OutputFormat = Field("jpeg", description="The format of the generated image.")
    acceleration: Acceleration = Field(
        "none", description="The speed of the generation: none (exact), regular or high (faster, lossy)."
    )
    _image_url = field_validator("image_url")(_check_image_url)


MAX_LORAS = 4  # applied together in one call: each adds its weights' work to every step
LORA_SCALE_MAX = 4.0
# What `path` of a LoRA takes besides an http(s) URL: a Hugging Face repo id ("owner/name"), or the name of
# a file in the operator's --lora-dir. Neither grammar has room for a dot segment or a second separator,
# so a name can never reach outside that directory.
HF_REPO_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}"
LORA_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
LORA_PATH_PATTERN = rf"^({HTTP_URL_PATTERN}|{HF_REPO_PATTERN}$|{LORA_NAME_PATTERN}$)"
_LORA_PATH = re.compile(LORA_PATH_PATTERN)


def _check_lora_path(value: str) -> str:
    if len(value) > URL_MAX_CHARS:
        raise PydanticCustomError(
            "string_too_long", "LoRA path longer than {max_length} characters", {"max_length": URL_MAX_CHARS}
        )
    if _LORA_PATH.match(value) is None:
        raise PydanticCustomError(
            "value_error",
            "must be an https:// or http:// URL of a .safetensors file, a Hugging Face repo id (owner/name) "
            "or the name of a LoRA in the server's LoRA directory",
        )
    return value


class LoraWeightInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    path: Annotated[str, AfterValidator(_check_lora_path)] = Field(
        description="The LoRA: an https/http URL of a .safetensors file, a Hugging Face repo id "
        "(owner/name), or the name of a file in the server's --lora-dir.",
        examples=["my-style"],
        json_schema_extra={"pattern": LORA_PATH_PATTERN},
    )
    scale: float = Field(
        1.0, ge=0, le=LORA_SCALE_MAX, description=f"How strongly it applies (0 to {LORA_SCALE_MAX:g})."
    )


Loras = Annotated[
    list[LoraWeightInput],
    Field(
        max_length=MAX_LORAS,
        description=f"LoRAs to apply together, each at its scale (at most {MAX_LORAS}). None: the base "
        "model, exactly as fal-ai/flux-kontext/dev.",
    ),
]


class _LoraFields(_KontextInput):
    """fal's flux-kontext-lora fields, shared by its edit, text-to-image and inpaint endpoints."""

    loras: Loras = []
    num_inference_steps: Annotated[int, Integer] = Field(
        30, ge=10, le=50, description="The number of denoising steps (10 to 50)."
    )
    guidance_scale: float = Field(
        2.5, ge=0, le=20, description="Classifier-free guidance: how closely the image follows the prompt."
    )
    enable_safety_checker: bool = DevEditInput.model_fields["enable_safety_checker"]
    output_format: OutputFormat = Field("png", description="The format of the generated image.")
    acceleration: Acceleration = Field(
        "none",
        description="The speed of the generation: none (exact), regular or high (faster, lossy). A request "
        "with LoRAs runs on the exact transformer whatever it asks (fp8 and fused layers take no LoRA).",
    )


class LoraEditInput(_LoraFields, _ResolutionModes):
    image_url: ImageUrl

    _image_url = field_validator("image_url")(_check_image_url)


class LoraTextToImageInput(_LoraFields):
    image_size: ImageSizePreset | ImageDimensions = Field(
        "landscape_4_3",
        description="The shape of the image: a preset or {width, height}, made at the nearest Kontext size "
        "(about one megapixel, the sizes the model was trained at).",
    )


class LoraInpaintInput(_LoraFields):
    image_url: ImageUrl = Field(description="The image to repaint: an https/http URL or a data: URI.")
    mask_url: ImageUrl = Field(
        description="The mask: white where the image is repainted, black where it is kept. Scaled to the "
        "image's size.",
    )
    reference_image_url: ImageUrl = Field(
        description="The reference whose content is painted into the masked area: a URL or a data: URI."
    )
    strength: float = Field(
        0.88,
        gt=0,
        le=1,
        description="How much of the masked area is made anew (above 0 to 1; at least one denoising step "
        "is always run).",
    )

    _image_urls = field_validator("image_url", "mask_url", "reference_image_url")(_check_image_url)


class Image(BaseModel):
    url: str = Field(description="Where to get the image: a URL, or a data: URI in sync mode.")
    width: int
    height: int
    content_type: str = Field(examples=["image/jpeg"])


class KontextOutput(BaseModel):
    images: list[Image] = Field(description="The generated images.")
    timings: dict[str, float] = Field(description="Seconds spent per stage, e.g. inference.")
    seed: int = Field(description="The seed used; the same seed and inputs reproduce these images.")
    has_nsfw_concepts: list[bool] = Field(
        description="Per image, in order: whether the safety checker (the provider's for BFL or fal, else "
        "this server's) flagged it; a flagged image is black, of the same size."
    )
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


class LogEntry(BaseModel):
    message: str
    level: Literal["STDERR", "STDOUT", "ERROR", "INFO", "WARN", "DEBUG"]
    source: Literal["USER"]
    timestamp: str = Field(description="ISO 8601, with its UTC offset.")


class QueueStatus(BaseModel):
    """The body of /status and of each status stream event."""

    status: Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    request_id: str
    response_url: str
    status_url: str
    cancel_url: str
    logs: list[LogEntry] | None = Field(description="The request's log lines when asked for (?logs=1).")
    metrics: dict[str, float] = Field(description="When completed, e.g. inference_time in seconds.")
    queue_position: int | None = Field(None, description="While IN_QUEUE: how many run first (0 = next).")
    error: str | None = Field(None, description="When COMPLETED with a failure: what went wrong.")
    error_type: str | None = Field(None, description="When COMPLETED with a failure: e.g. request_timeout.")
    preview: str | None = Field(
        None,
        description="Status streams asked with ?previews=1, while it runs on the local model: a small JPEG "
        "data URI of the image being made (a rough look at the latents, every few steps).",
    )
