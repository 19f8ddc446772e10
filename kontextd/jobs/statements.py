"""The SQL both job stores run alike, written once: the embedded SQLite store and the shared PostgreSQL one
keep the same tables and columns and mostly speak the same SQL.

Every way the two dialects differ in that SQL is one constant fragment of `Dialect` (placeholders, table
names, booleans, row locks, ignoring a duplicate row, a list bound as one parameter); `Statements` builds
each store's texts from them once, at import. Nothing here is built from a value known only at run time:
values are always bound parameters, and the few names chosen at run time (a counter column) pick one of
the texts made here. The code that runs them once for both stores is `kontextd.jobs.sql_store`; what
really differs between the stores stays in each: ticket allocation and queue positions, hole pruning,
transactions and notifications, and PostgreSQL's one-statement claims and ends of work.
"""

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from kontextd.jobs import lifecycle, outcomes, rows
from kontextd.jobs.model import NewJob, Outcome

# What deciding about a job needs, without its input and result bodies (possibly megabytes).
CONTROL_COLUMNS = (
    "request_id, gateway_request_id, owner, lane, state, priority, ticket, start_deadline, worker_id,"
    " webhook_url, output_ttl, cancel_requested, no_retry, failures, interruptions, storage_failures,"
    " affinity"
)


@dataclass(frozen=True)
class Dialect:
    """The SQL fragments in which the two stores differ, each a constant."""

    param: str  # a positional placeholder
    named_param: str  # a placeholder bound by name, the name at {}
    prefix: str  # of every table name: the PostgreSQL database may be shared with other applications
    true: str  # a boolean column's true, as the column is typed
    output_kept: str  # "the outputs are kept", worded as the partial index's condition: the planner uses it
    output_gone: str  # "the outputs expired" (a tombstone), worded as its partial index's condition
    lock: str  # ends a read of the row a transaction decides on: held to the commit ("" with one writer)
    skip_locked: str  # ends a sweep's read: rows another node holds are skipped, not waited for
    expiry_order: str  # the order expired queued jobs are ended in ("": the deadline index's, as ever)
    creation_order: str  # a column in the order jobs were made
    insert_ignoring: str  # the start of an INSERT that leaves an existing row alone...
    on_duplicate: str  # ...and its end
    with_entry: str  # a JSON object text (the column at {column}) with one (name, value) more, both bound
    in_texts: str  # "is one of the texts in one bound parameter", after a column
    in_numbers: str  # the same for integers
    bind_list: Callable[[Collection[Any]], Any]  # the value that parameter is bound to
    holds_nul: bool  # text may hold NUL characters (PostgreSQL's cannot)

    def table(self, name: str) -> str:
        return self.prefix + name

    def named(self, name: str) -> str:
        return self.named_param.format(name)


SQLITE = Dialect(
    param="?",
    named_param=":{}",
    prefix="",
    true="1",
    output_kept="output_expired = 0",
    output_gone="output_expired = 1",
    lock="",
    skip_locked="",
    expiry_order="",
    creation_order="rowid",
    insert_ignoring="INSERT OR IGNORE INTO",
    on_duplicate="",
    with_entry="json_patch(coalesce({column}, '{{}}'), json_object(?, ?))",
    in_texts="IN (SELECT value FROM json_each(?))",
    in_numbers="IN (SELECT value FROM json_each(?))",
    bind_list=lambda values: json.dumps(list(values)),
    holds_nul=True,
)

POSTGRES = Dialect(
    param="%s",
    named_param="%({})s",
    prefix="kontextd_",
    true="true",
    output_kept="NOT output_expired",
    output_gone="output_expired",
    lock=" FOR UPDATE",
    skip_locked=" FOR UPDATE SKIP LOCKED",
    expiry_order=" ORDER BY seq",
    creation_order="seq",
    insert_ignoring="INSERT INTO",
    on_duplicate=" ON CONFLICT DO NOTHING",
    with_entry="(coalesce({column}, '{{}}')::jsonb || jsonb_build_object(%s::text, %s::text))::text",
    in_texts="= ANY(%s::text[])",
    in_numbers="= ANY(%s::bigint[])",
    bind_list=list,
    holds_nul=False,
)


# The columns a submit fills, in the order of Statements.new_job_values().
NEW_JOB_COLUMNS = (
    "request_id, gateway_request_id, app_id, owner, lane, input_json, state, priority, ticket, created_at,"
    " start_deadline, no_retry, webhook_url, output_ttl, affinity"
)


class Statements:
    """One dialect's texts of the statements both stores run, named for what they do."""

    def __init__(self, dialect: Dialect) -> None:
        d, p = dialect, dialect.param
        jobs, logs, webhooks = d.table("jobs"), d.table("job_logs"), d.table("webhook_deliveries")
        self.dialect = dialect

        # -- jobs
        self.job = f"SELECT * FROM {jobs} WHERE request_id = {p}"
        self.summary = (
            "SELECT request_id, app_id, owner, state, outcome_json, output_expired, lane, priority, ticket"
            f" FROM {jobs} WHERE request_id = {p}"
        )
        self.control = f"SELECT {CONTROL_COLUMNS} FROM {jobs} WHERE request_id = {p}{d.lock}"
        # The next job of a lane to run: what deciding and timing out need (the input, possibly megabytes,
        # is read once it starts); on a shared store the first no other node holds.
        self.queue_head = (
            f"SELECT {CONTROL_COLUMNS} FROM {jobs} WHERE state = 'IN_QUEUE' AND lane = {p}"
            f" ORDER BY priority, ticket LIMIT 1{d.skip_locked}"
        )
        # A job a worker is preferred for (its affinity among the worker's), of the head's level and within
        # the AFFINITY_WINDOW tickets behind it: a bounded index range, and a bounded wait for those skipped.
        self.preferred_head = (
            f"SELECT {CONTROL_COLUMNS} FROM {jobs} WHERE state = 'IN_QUEUE' AND lane = {p} AND priority = {p}"
            f" AND ticket > {p} AND ticket <= {p} AND affinity {d.in_texts}"
            f" ORDER BY ticket LIMIT 1{d.skip_locked}"
        )
        self.start = (
            f"UPDATE {jobs} SET state = 'IN_PROGRESS', worker_id = {p}, lease_expires_at = {p},"
            f" started_at = {p}, attempts = attempts + 1, preview = NULL WHERE request_id = {p} RETURNING *"
        )
        self.renew_lease = (
            f"UPDATE {jobs} SET lease_expires_at = {p} WHERE request_id = {p} AND worker_id = {p}"
            " AND state = 'IN_PROGRESS'"
        )
        self.finish = (  # parameters: finish_params(); ends with its WHERE, which a store may narrow
            f"UPDATE {jobs} SET state = 'COMPLETED', completed_at = {p}, outcome_json = {p},"
            f" result_json = {p}, expires_at = {p} + output_ttl, worker_id = NULL, lease_expires_at = NULL,"
            f" checkpoints_json = NULL, preview = NULL WHERE request_id = {p}"
        )
        # The running job's latest preview, by the worker running it only (JobStore.set_preview).
        self.set_preview = (
            f"UPDATE {jobs} SET preview = {p} WHERE request_id = {p} AND worker_id = {p}"
            " AND state = 'IN_PROGRESS'"
        )
        self.preview = f"SELECT preview FROM {jobs} WHERE request_id = {p} AND state = 'IN_PROGRESS'"
        self.queue_webhook = (  # parameters: webhook_params()
            f"INSERT INTO {webhooks} (request_id, url, user_id, body, next_attempt_at)"
            f" VALUES ({p}, {p}, {p}, {p}, {p})"
        )
        self.leave_queue = (
            f"{d.insert_ignoring} {d.table('queue_holes')} (lane, priority, ticket)"
            f" VALUES ({p}, {p}, {p}){d.on_duplicate}"
        )
        # Parameters: name, value, request id, worker id. Only by the worker running the job; one statement,
        # so the tasks of one request keeping theirs at once never lose each other's.
        self.checkpoint = (
            f"UPDATE {jobs} SET checkpoints_json = {d.with_entry.format(column='checkpoints_json')}"
            f" WHERE request_id = {p} AND worker_id = {p} AND state = 'IN_PROGRESS'"
        )
        # A running job handed back: no worker, no lease; it did start in time once, so the start deadline
        # no longer applies to the re-run.
        self.unassign = (
            f"UPDATE {jobs} SET worker_id = NULL, lease_expires_at = NULL, started_at = NULL,"
            f" start_deadline = NULL WHERE request_id = {p}"
        )
        self.request_cancel = f"UPDATE {jobs} SET cancel_requested = {d.true} WHERE request_id = {p}"
        self.cancel_requested = f"SELECT cancel_requested FROM {jobs} WHERE request_id = {p}"
        # One text per counter a stop adds to (lifecycle.Requeue.counter): a column name never comes from
        # anywhere but this table.
        self.count: dict[str, str] = {
            counter: f"UPDATE {jobs} SET {counter} = {p} WHERE request_id = {p}"
            for counter in lifecycle.COUNTERS
        }

        # -- logs
        log_line = f"INSERT INTO {logs} (request_id, timestamp, level, message)"
        self.append_log = f"{log_line} VALUES ({p}, {p}, {p}, {p})"
        self.requeued_log = f"{log_line} VALUES ({p}, {p}, 'WARN', {p})"
        self.logs = f"SELECT message, level, timestamp FROM {logs} WHERE request_id = {p} ORDER BY seq"

        # -- housekeeping sweeps: each reads its rows with skip_locked, so several nodes may sweep at once
        self.unstarted = (
            f"SELECT {CONTROL_COLUMNS} FROM {jobs} WHERE state = 'IN_QUEUE' AND start_deadline IS NOT NULL"
            f" AND start_deadline < {p}{d.expiry_order}{d.skip_locked}"
        )
        self.lapsed = (
            f"SELECT {CONTROL_COLUMNS} FROM {jobs} WHERE state = 'IN_PROGRESS' AND lease_expires_at < {p}"
            f" ORDER BY started_at, {d.creation_order}{d.skip_locked}"
        )
        # Per lane: queued jobs and the oldest's submit time (JobStore.queue_depths; one scrape's read).
        self.queue_depths = (
            f"SELECT lane, COUNT(*) AS depth, MIN(created_at) AS oldest FROM {jobs}"
            " WHERE state = 'IN_QUEUE' GROUP BY lane"
        )
        self.misrouted = (
            f"SELECT {CONTROL_COLUMNS} FROM {jobs} WHERE state = 'IN_QUEUE' AND app_id = {p} AND lane <> {p}"
            f" ORDER BY priority, ticket{d.skip_locked}"
        )
        self.expired_outputs = (
            f"SELECT request_id, outcome_json FROM {jobs} WHERE {d.output_kept}"
            f" AND expires_at IS NOT NULL AND expires_at < {p} LIMIT {p}"
        )
        self.mark_output_expired = (
            f"UPDATE {jobs} SET output_expired = {d.true}, result_json = '{{}}', input_json = '{{}}'"
            f" WHERE request_id = {p}"
        )
        self.drop_logs = f"DELETE FROM {logs} WHERE request_id = {p}"
        # Tombstones whose time is up; a delivery still to be tried keeps its request's record until it is
        # delivered or given up.
        self.prunable = (
            f"SELECT request_id FROM {jobs} AS job WHERE {d.output_gone} AND expires_at < {p}"
            f" AND NOT EXISTS (SELECT 1 FROM {webhooks} AS hook WHERE hook.request_id = job.request_id"
            f" AND hook.state NOT IN ('delivered', 'failed')) LIMIT {p}{d.skip_locked}"
        )
        # A pruned record's rows, each table's bound to bind_list(request ids); the job's own row last.
        self.prune: tuple[str, ...] = tuple(
            f"DELETE FROM {table} WHERE request_id {d.in_texts}" for table in (logs, webhooks, jobs)
        )

        # -- webhooks
        # Due: pending, or in flight past the sender's deadline. The state test reads exactly as the partial
        # index's, for SQLite to use it; `_after` continues a listing after (due time, delivery id).
        due = (
            f"SELECT delivery_id, request_id, url, next_attempt_at FROM {webhooks}"
            f" WHERE state IN ('pending', 'sending') AND next_attempt_at <= {p}"
        )
        order = f" ORDER BY next_attempt_at, delivery_id LIMIT {p}"
        self.due_webhooks = due + order
        self.due_webhooks_after = f"{due} AND (next_attempt_at, delivery_id) > ({p}, {p}){order}"
        release = f"UPDATE {webhooks} SET state = 'pending', next_attempt_at = {p} WHERE state = 'sending'"
        self.release_webhooks = release
        self.release_named_webhooks = f"{release} AND delivery_id {d.in_numbers}"
        self.start_webhook = (
            f"UPDATE {webhooks} SET state = 'sending', next_attempt_at = {p}"
            f" WHERE delivery_id = {p} AND state IN ('pending', 'sending') AND next_attempt_at <= {p}"
            " RETURNING *"
        )
        self.webhook_attempted = (  # a delivery that already ended stays as it ended
            f"UPDATE {webhooks} SET attempts = attempts + 1, state = {p}, next_attempt_at = {p},"
            f" last_error = {p} WHERE delivery_id = {p} AND state IN ('pending', 'sending')"
        )
        self.webhook_deliveries = f"SELECT * FROM {webhooks} WHERE request_id = {p} ORDER BY delivery_id"

        # -- uploads: a record is the upload's owner and expiry (JobStore.add_upload)
        uploads = d.table("uploads")
        self.add_upload = (
            f"{d.insert_ignoring} {uploads} (file_key, owner, expires_at)"
            f" VALUES ({p}, {p}, {p}){d.on_duplicate}"
        )
        self.upload_owner = f"SELECT owner FROM {uploads} WHERE file_key = {p} AND expires_at > {p}"
        self.expired_uploads = (
            f"SELECT file_key FROM {uploads} WHERE expires_at <= {p} ORDER BY expires_at LIMIT {p}"
        )
        self.forget_uploads = f"DELETE FROM {uploads} WHERE file_key {d.in_texts}"
        # -- usage: totals per (owner, app id, day), added to by each completed request
        usage = d.table("usage")
        self.add_usage = (
            f"INSERT INTO {usage} (owner, app_id, day, requests, images, megapixels, gpu_seconds)"
            f" VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}) ON CONFLICT (owner, app_id, day) DO UPDATE SET"
            f" requests = {usage}.requests + excluded.requests, images = {usage}.images + excluded.images,"
            f" megapixels = {usage}.megapixels + excluded.megapixels,"
            f" gpu_seconds = {usage}.gpu_seconds + excluded.gpu_seconds"
        )
        usage_columns = "owner, app_id, day, requests, images, megapixels, gpu_seconds"
        self.usage = f"SELECT {usage_columns} FROM {usage} WHERE day >= {p} AND day <= {p}"
        self.usage_of = f"{self.usage} AND owner = {p} ORDER BY day, owner, app_id"
        self.usage += " ORDER BY day, owner, app_id"

        # -- secrets
        self.secret = f"SELECT value FROM {d.table('secrets')} WHERE name = {p}"
        self.keep_secret = (
            f"{d.insert_ignoring} {d.table('secrets')} (name, value) VALUES ({p}, {p}){d.on_duplicate}"
        )

    def text(self, value: str) -> str:
        """`value` as this dialect's text can hold it: PostgreSQL's cannot hold NUL, so the line is kept
        with the spot marked."""
        return value if self.dialect.holds_nul else value.replace("\x00", "\ufffd")

    def new_job_values(self, ticket: str) -> str:
        """NEW_JOB_COLUMNS' values, bound by name to new_job_params(), queued in state IN_QUEUE with `ticket`
        (a constant SQL expression: each store allocates tickets its own way)."""
        n = self.dialect.named
        return (
            f"{n('request_id')}, {n('gateway_request_id')}, {n('app_id')}, {n('owner')}, {n('lane')},"
            f" {n('input')}, 'IN_QUEUE', {n('priority')}, {ticket}, {n('created_at')}, {n('start_deadline')},"
            f" {n('no_retry')}, {n('webhook_url')}, {n('output_ttl')}, {n('affinity')}"
        )


def finish_params(request_id: str, outcome: Outcome, now: float) -> tuple[Any, ...]:
    """Statements.finish's parameters: how the job ended, at `now` (its outputs expire `output_ttl` later,
    never when it has none)."""
    outcome_json = json.dumps(rows.outcome_fields(outcome))
    return (now, outcome_json, json.dumps(outcome.body), now, request_id)


def webhook_params(row: rows.Row, outcome: Outcome, now: float) -> tuple[Any, ...]:
    """Statements.queue_webhook's parameters: the job's delivery, due at once."""
    body = outcomes.webhook_body(row["request_id"], row["gateway_request_id"], outcome)
    return (row["request_id"], row["webhook_url"], row["owner"], body, now)


def new_job_params(job: NewJob, created_at: float) -> dict[str, Any]:
    """The values of Statements.new_job_values(), by name."""
    return {
        "request_id": job.request_id,
        "gateway_request_id": job.gateway_request_id,
        "app_id": job.app_id,
        "owner": job.owner,
        "lane": job.lane,
        "input": json.dumps(job.input),
        "priority": int(job.priority),
        "created_at": created_at,
        "start_deadline": job.start_deadline,
        "no_retry": job.no_retry,
        "webhook_url": job.webhook_url,
        "output_ttl": job.output_ttl_seconds,
        "affinity": job.affinity,
    }


def attempt_state(delivered: bool, next_attempt_at: float | None) -> str:
    """Where a delivery stands after a finished try: no next try and not delivered means given up."""
    if delivered:
        return "delivered"
    return "pending" if next_attempt_at is not None else "failed"
