"""The ways a request can end, in fal's wire shapes, built in one place for every path that ends one."""

import json
from typing import Any

from kontextd.jobs.model import Outcome


def succeeded(
    output: dict[str, Any], inference_seconds: float, output_keys: tuple[str, ...], served_by: str
) -> Outcome:
    return Outcome(
        200,
        output,
        metrics={"inference_time": round(inference_seconds, 4)},
        output_keys=output_keys,
        served_by=served_by,
    )


def refused(message: str, error_type: str, status_code: int, location: str = "body") -> Outcome:
    """A request the model or its provider would not serve: moderated, out of credits, rejected."""
    detail = [{"loc": [location], "msg": message, "type": error_type}]
    return Outcome(status_code, {"detail": detail}, error=message, error_type=error_type)


def invalid_input(detail: list[dict[str, Any]], message: str) -> Outcome:
    return Outcome(422, {"detail": detail}, error=message, error_type=detail[0]["type"])


def cancelled() -> Outcome:
    return Outcome(
        400,
        {"detail": "Request was cancelled by the client", "error_type": "client_cancelled"},
        error="Request was cancelled by the client",
        error_type="client_cancelled",
    )


def timed_out() -> Outcome:
    return Outcome(
        504,
        {"detail": "Request timed out", "error_type": "request_timeout"},
        error="Request timed out before it started",
        error_type="request_timeout",
    )


def internal_error(message: str) -> Outcome:
    return Outcome(
        500,
        {"detail": message, "error_type": "internal_server_error"},
        error=message,
        error_type="internal_server_error",
    )


def storage_error(tries: int) -> Outcome:
    """The images could not be stored (disk full, object storage down), `tries` times: retryable later,
    hence 503."""
    message = "The server's storage is full or unavailable: this request's images could not be stored"
    message += f" ({tries} tries)" if tries > 1 else ""
    return Outcome(
        503, {"detail": message, "error_type": "storage_error"}, error=message, error_type="storage_error"
    )


def webhook_body(request_id: str, gateway_request_id: str, outcome: Outcome) -> bytes:
    """The JSON fal POSTs to `fal_webhook` when a request ends."""
    message: dict[str, Any] = {"request_id": request_id, "gateway_request_id": gateway_request_id}
    if outcome.ok:
        message |= {"status": "OK", "payload": outcome.body}
    else:
        message |= {
            "status": "ERROR",
            "error": f"Invalid status code: {outcome.status_code}",
            "payload": outcome.body,
        }
    return json.dumps(message, separators=(",", ":")).encode()
