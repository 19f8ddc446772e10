"""What each route may answer besides success, for the OpenAPI document: every status a route returns is
listed here with its body's shape, so generated clients and contract tests know them all."""

from typing import Any, Literal

from pydantic import BaseModel, Field

from kontextd.catalogue.schemas import QueueStatus


class Message(BaseModel):
    detail: str = Field(description="What went wrong, for a person to read.")


class ErrorWithType(Message):
    error_type: str = Field(description="fal's error type, e.g. service_unavailable, internal_server_error.")


class ErrorDetail(BaseModel):
    loc: list[str | int] = Field(description='Where: ["body", field], ["header", name] or ["query", name].')
    msg: str
    type: str = Field(description="pydantic's error type, or fal's (image_too_large, file_download_error …).")
    input: Any = Field(None, description="The offending value, shortened; data URIs are summarised.")
    ctx: dict[str, Any] | None = None


class ValidationErrors(BaseModel):
    detail: list[ErrorDetail]


class CancelStatus(BaseModel):
    status: Literal["CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND"]


Responses = dict[int | str, dict[str, Any]]

UNAUTHORIZED: Responses = {401: {"model": Message, "description": "Missing or invalid API key"}}
NOT_FOUND: Responses = {
    404: {"model": Message, "description": "No such request for this key (another key's looks the same)"}
}
BAD_PARAMETER: Responses = {422: {"model": ValidationErrors, "description": "A query parameter is invalid"}}

SUBMIT_RESPONSES: Responses = {
    400: {"model": ValidationErrors, "description": "A request header is invalid"},
    **UNAUTHORIZED,
    413: {"model": Message, "description": "Body larger than 64 MB"},
    415: {"model": Message, "description": "Body not sent with Content-Type: application/json"},
    422: {"model": ValidationErrors, "description": "The input, a query parameter or the JSON is invalid"},
    503: {
        "model": ErrorWithType,
        "description": "The server cannot take requests now (disk full); retry after Retry-After seconds",
    },
}
FAILED_REQUEST: Responses = {
    "4XX": {"description": "The request failed on its input: its own status and body, as fal answers"},
    "5XX": {"description": "The request failed on the server or an upstream: its own status and body"},
}
RUN_RESPONSES: Responses = {**FAILED_REQUEST, **SUBMIT_RESPONSES}
STATUS_RESPONSES: Responses = {
    200: {"description": "Completed (possibly with an error)"},
    202: {"model": QueueStatus, "description": "Queued or running"},
    **UNAUTHORIZED,
    **NOT_FOUND,
    **BAD_PARAMETER,
}
STREAM_RESPONSES: Responses = {
    200: {
        "content": {"text/event-stream": {}},
        "description": "`data: <status JSON>` events until COMPLETED; `: ping` comments keep it alive",
    },
    **UNAUTHORIZED,
    **NOT_FOUND,
    **BAD_PARAMETER,
}
RUN_STREAM_RESPONSES: Responses = {
    200: {
        "content": {"text/event-stream": {}},
        "description": "`data: <status JSON>` events as the request moves, then `data: <output JSON>`; a"
        " request that failed ends with `event: error` and its error body; `: ping` comments in between",
    },
    **SUBMIT_RESPONSES,
}
RESULT_RESPONSES: Responses = {
    **FAILED_REQUEST,
    400: {"model": Message, "description": "Still in progress (or, with error_type, cancelled)"},
    **UNAUTHORIZED,
    **NOT_FOUND,
    410: {"model": Message, "description": "Its outputs have expired"},
}
CANCEL_RESPONSES: Responses = {
    202: {"model": CancelStatus, "description": "Cancelled if queued; a running request stops between steps"},
    400: {"model": CancelStatus, "description": "ALREADY_COMPLETED"},
    **UNAUTHORIZED,
    404: {"model": CancelStatus, "description": "NOT_FOUND"},
}
