"""Cancel a queued request and a running one with the unmodified client."""

import time
from typing import Any

import fal_client
from _common import DEV_EDIT, describe, emit, http_error, png_data_uri

LONG = {"prompt": "make it night", "image_url": png_data_uri(64, 64), "num_inference_steps": 50}


def wait_status(handle: fal_client.SyncRequestHandle, done: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = describe(handle.status(with_logs=True))
        if done(status):
            return status
        time.sleep(0.02)
    raise TimeoutError(f"{handle.request_id}: condition not met")


def step_logs(status: dict[str, Any]) -> list[str]:
    return [line["message"] for line in status.get("logs") or [] if "step" in line["message"]]


running = fal_client.submit(DEV_EDIT, LONG)
queued = fal_client.submit(DEV_EDIT, {**LONG, "num_inference_steps": 10})

# The second request waits behind the first (one worker): cancel it while it is still queued.
queued_before = describe(queued.status())
fal_client.cancel(DEV_EDIT, queued.request_id)  # module function: URL rebuilt from the request id
queued_after = describe(fal_client.status(DEV_EDIT, queued.request_id, with_logs=True))
try:
    queued.get()
    queued_get: dict[str, Any] = {"raised": False}
except fal_client.FalClientHTTPError as error:
    queued_get = {"raised": True, **http_error(error)}
try:
    queued.cancel()
    cancel_again: dict[str, Any] = {"raised": False}
except fal_client.FalClientHTTPError as error:
    cancel_again = {"raised": True, **http_error(error)}

# The first one: cancel once a denoising step has been logged.
seen_running = wait_status(running, lambda status: status["type"] != "Queued" and step_logs(status))
running.cancel()
running_after = wait_status(running, lambda status: status["type"] == "Completed")
try:
    running.get()
    running_get: dict[str, Any] = {"raised": False}
except fal_client.FalClientHTTPError as error:
    running_get = {"raised": True, **http_error(error)}

emit(
    {
        "queued": {
            "before": queued_before,
            "after": queued_after,
            "get": queued_get,
            "cancel_again": cancel_again,
        },
        "running": {
            "seen": seen_running,
            "after": running_after,
            "get": running_get,
            "steps_logged": step_logs(running_after),
        },
    }
)
