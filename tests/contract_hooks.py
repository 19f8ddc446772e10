"""Schemathesis hooks for tests/test_openapi_contract.py, loaded through SCHEMATHESIS_HOOKS.

Every URL a generated request would have the server connect to is pointed at loopback first, so the run
never reaches beyond 127.0.0.1 (not even a DNS lookup of a generated host name); and every request the
queue accepts is cancelled at once, so queued work never piles up ahead of the sync runs.
"""

import base64
import os
import re
from typing import Any

import httpx
import schemathesis

from kontextd.api.openai_images import ONE_IMAGE_MODELS
from kontextd.catalogue.schemas import HTTP_URL_PATTERN, LORA_PATH_PATTERN

IMAGE = os.environ["CONTRACT_IMAGE_URL"]  # a PNG on a loopback server the kontextd under test may fetch
INLINE_IMAGE = os.environ["CONTRACT_INLINE_IMAGE"]  # the same kind of PNG as a data URI
WEBHOOK = os.environ["CONTRACT_WEBHOOK_URL"]  # a loopback receiver
AUTHORIZATION = os.environ["CONTRACT_AUTHORIZATION"]
LORA = os.environ["CONTRACT_LORA"]  # the name of a LoRA in the server's --lora-dir
_LORA_PATH = re.compile(LORA_PATH_PATTERN)
_HTTP_URL = re.compile(f"^{HTTP_URL_PATTERN}")
_DATA_URI = re.compile(r"^data:[^,]{0,190};base64,")
PNG = base64.b64decode(INLINE_IMAGE.partition(",")[2])


@schemathesis.hook
def before_call(ctx: Any, case: Any, **kwargs: Any) -> None:
    # Only values the schema accepts are rewritten: invalid ones are refused at submit, never fetched, and
    # must reach the server as generated for the negative checks to mean anything.
    if case.path == "/v1/images/edits" and isinstance(case.body, dict):
        _openai_edit(case.body)
    elif isinstance(case.body, dict):
        for name in ("image_url", "mask_url", "reference_image_url"):
            if isinstance(url := case.body.get(name), str):
                case.body[name] = _loopback(url)
        if isinstance(urls := case.body.get("image_urls"), list):
            case.body["image_urls"] = [_loopback(url) if isinstance(url, str) else url for url in urls]
        for lora in case.body.get("loras") or []:
            # A generated path would be fetched (a URL) or looked up (a repo id, offline) and be no LoRA
            # file, so a valid request would end in a 422: valid ones name the server's own LoRA instead.
            if (
                isinstance(lora, dict)
                and isinstance(path := lora.get("path"), str)
                and _LORA_PATH.match(path)
            ):
                lora["path"] = LORA
    if case.query and isinstance(hook := case.query.get("fal_webhook"), str) and _HTTP_URL.match(hook):
        case.query["fal_webhook"] = WEBHOOK


def _openai_edit(body: dict[str, Any]) -> None:
    """OpenAI's edit form: generated file bytes are no image (decoding would fail), so each becomes a real
    PNG; a model that edits one image (which the schema cannot tie to `model`) is sent its first only."""
    image = body.get("image")
    if _is_file(image):
        body["image"] = PNG
    elif isinstance(image, list):
        images = [PNG if _is_file(each) else each for each in image]
        body["image"] = images[:1] if body.get("model") in ONE_IMAGE_MODELS else images


def _is_file(value: Any) -> bool:
    """Generated file contents: bytes, or schemathesis' Binary (file samples: PNG, PDF, ZIP …)."""
    return isinstance(value, bytes) or isinstance(getattr(value, "data", None), bytes)


def _loopback(url: str) -> str:
    if _HTTP_URL.match(url):
        return IMAGE
    if _DATA_URI.match(url):
        return INLINE_IMAGE  # generated base64 is no image: decoding would fail
    return url


@schemathesis.hook
def after_call(ctx: Any, case: Any, response: Any) -> None:
    if response.status_code != 200:
        return
    try:
        body = response.json()
    except ValueError:
        return
    if isinstance(body, dict) and isinstance(body.get("cancel_url"), str):
        httpx.put(body["cancel_url"], headers={"Authorization": AUTHORIZATION}, timeout=30)
