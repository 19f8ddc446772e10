"""fal's queue wire shapes: request URLs, status bodies and log lines."""

from datetime import UTC, datetime
from typing import Any

from kontextd.jobs.model import JobSummary, LogLine, State


def queue_prefix(app_id: str) -> str:
    """Status, result and cancel URLs use only the first two segments of the app id."""
    return "/".join(app_id.split("/")[:2])


def request_urls(base_url: str, app_id: str, request_id: str) -> dict[str, str]:
    response_url = f"{base_url.rstrip('/')}/{queue_prefix(app_id)}/requests/{request_id}"
    return {
        "response_url": response_url,
        "status_url": f"{response_url}/status",
        "cancel_url": f"{response_url}/cancel",
    }


def log_entry(line: LogLine) -> dict[str, str]:
    return {
        "message": line.message,
        "level": line.level,
        "source": "USER",
        "timestamp": datetime.fromtimestamp(line.timestamp, UTC).isoformat(),
    }


def status_body(
    job: JobSummary, base_url: str, queue_position: int | None, logs: list[LogLine] | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "status": job.state.value,
        "request_id": job.request_id,
        **request_urls(base_url, job.app_id, job.request_id),
        "logs": None if logs is None else [log_entry(line) for line in logs],
        "metrics": {},
    }
    if job.state == State.IN_QUEUE:
        body["queue_position"] = queue_position if queue_position is not None else 0
    if job.state == State.COMPLETED:
        body["metrics"] = job.metrics
        if job.error is not None:
            body["error"] = job.error
            body["error_type"] = job.error_type
    return body
