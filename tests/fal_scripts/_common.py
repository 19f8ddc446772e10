"""Helpers shared by the fal-client scenario scripts (each runs as its own process: fal_client reads its
hosts from the environment at import time)."""

import base64
import io
import json
import sys
from typing import Any

import fal_client
from PIL import Image

TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/text-to-image"
MAX_EDIT = "fal-ai/flux-pro/kontext/max"
DEV_EDIT = "fal-ai/flux-kontext/dev"


def describe(status: fal_client.Status) -> dict[str, Any]:
    """A fal_client status object as JSON the test can assert on."""
    if isinstance(status, fal_client.Queued):
        return {"type": "Queued", "position": status.position}
    if isinstance(status, fal_client.InProgress):
        return {"type": "InProgress", "logs": status.logs}
    if isinstance(status, fal_client.Completed):
        return {
            "type": "Completed",
            "logs": status.logs,
            "metrics": status.metrics,
            "error": status.error,
            "error_type": status.error_type,
        }
    raise TypeError(f"unexpected status {status!r}")


def http_error(error: fal_client.FalClientHTTPError) -> dict[str, Any]:
    return {"status_code": error.status_code, "message": str(error), "error_type": error.error_type}


def png_data_uri(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (30, 140, 200)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def emit(result: dict[str, Any]) -> None:
    """The test reads the last stdout line as the scenario's result."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
