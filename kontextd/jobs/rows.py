"""What the SQLite and PostgreSQL stores share: turning a stored row into the model's objects, and packing
how a request ended into the small `outcome_json` every status poll reads.

Both stores name their columns alike, so one conversion serves both (the SQL they share is in
`kontextd.jobs.statements`).
A row is anything indexable by column name: an `sqlite3.Row` or a psycopg `dict_row`.
"""

import json
from typing import Any, Protocol

from kontextd.jobs.model import (
    DueWebhook,
    Job,
    JobSummary,
    LogLine,
    Outcome,
    Priority,
    State,
    WebhookDelivery,
)


class Row(Protocol):
    def __getitem__(self, column: str) -> Any: ...


def outcome_fields(outcome: Outcome) -> dict[str, Any]:
    """How a request ended, without its result body (kept apart in `result_json`: possibly megabytes)."""
    return {
        "status_code": outcome.status_code,
        "error": outcome.error,
        "error_type": outcome.error_type,
        "metrics": outcome.metrics,
        "output_keys": list(outcome.output_keys),
        "served_by": outcome.served_by,
    }


def output_keys(outcome_json: str) -> list[str]:
    """The stored files a finished request's outputs live in (they expire with it)."""
    return json.loads(outcome_json)["output_keys"]


def expired_output(row: Row) -> tuple[str, list[str]]:
    """From a row of request_id and outcome_json: the request and the stored files to delete."""
    return row["request_id"], output_keys(row["outcome_json"])


def log_line(row: Row) -> LogLine:
    return LogLine(row["message"], row["level"], row["timestamp"])


def due_webhook(row: Row) -> DueWebhook:
    """From a row of delivery_id, request_id, url and next_attempt_at."""
    return DueWebhook(row["delivery_id"], row["request_id"], row["url"], row["next_attempt_at"])


def delivery(row: Row) -> WebhookDelivery:
    return WebhookDelivery(
        delivery_id=row["delivery_id"],
        request_id=row["request_id"],
        url=row["url"],
        user_id=row["user_id"],
        body=row["body"],
        attempts=row["attempts"],
        state=row["state"],
        last_error=row["last_error"],
    )


def summary(row: Row) -> JobSummary:
    """From a row of request_id, app_id, state, outcome_json and output_expired."""
    ending = json.loads(row["outcome_json"]) if row["outcome_json"] is not None else {}
    return JobSummary(
        request_id=row["request_id"],
        app_id=row["app_id"],
        state=State(row["state"]),
        metrics=ending.get("metrics", {}),
        error=ending.get("error"),
        error_type=ending.get("error_type"),
        output_expired=bool(row["output_expired"]),
    )


def job(row: Row) -> Job:
    outcome = None
    if row["outcome_json"] is not None:
        fields = json.loads(row["outcome_json"])
        outcome = Outcome(
            status_code=fields["status_code"],
            body=json.loads(row["result_json"]),
            error=fields["error"],
            error_type=fields["error_type"],
            metrics=fields["metrics"],
            output_keys=tuple(fields["output_keys"]),
            served_by=fields.get("served_by"),
        )
    return Job(
        request_id=row["request_id"],
        gateway_request_id=row["gateway_request_id"],
        app_id=row["app_id"],
        owner=row["owner"],
        lane=row["lane"],
        input=json.loads(row["input_json"]),
        state=State(row["state"]),
        priority=Priority(row["priority"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        cancel_requested=bool(row["cancel_requested"]),
        attempts=row["attempts"],
        webhook_url=row["webhook_url"],
        outcome=outcome,
        output_expired=bool(row["output_expired"]),
        failures=row["failures"],
        interruptions=row["interruptions"],
        storage_failures=row["storage_failures"],
        checkpoints=json.loads(row["checkpoints_json"] or "{}"),
        affinity=row["affinity"],
    )
