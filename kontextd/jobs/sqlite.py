"""The embedded job store: one SQLite file in WAL mode, owned by one server process.

Each backend (the local model, an upstream API) has its own queue lane, served by its own workers.
Queue positions are exact without counting the queue: each priority level of a lane hands out dense
tickets, and a job's position is its distance from the head of its level, minus the jobs that left out of
order ("holes"), plus the length of the lane's levels ahead of it. Every lookup is an index seek.
"""

import contextlib
import fcntl
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from kontextd.jobs import outcomes
from kontextd.jobs.model import (
    CancelResult,
    Job,
    JobSummary,
    LogLine,
    NewJob,
    Outcome,
    Priority,
    State,
    WebhookDelivery,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    request_id TEXT PRIMARY KEY,
    gateway_request_id TEXT NOT NULL,
    app_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    lane TEXT NOT NULL,  -- the backend whose workers run it
    input_json TEXT NOT NULL,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    ticket INTEGER NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    start_deadline REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    no_retry INTEGER NOT NULL DEFAULT 0,
    worker_id TEXT,
    lease_expires_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    webhook_url TEXT,
    output_ttl REAL,
    outcome_json TEXT,  -- how it ended, small: read by every status poll
    result_json TEXT,  -- the result body, possibly megabytes of data URIs: read only by the result route
    expires_at REAL,
    output_expired INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(lane, priority, ticket) WHERE state = 'IN_QUEUE';
CREATE INDEX IF NOT EXISTS jobs_deadline ON jobs(start_deadline)
    WHERE state = 'IN_QUEUE' AND start_deadline IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_running ON jobs(lease_expires_at) WHERE state = 'IN_PROGRESS';
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs(expires_at)
    WHERE output_expired = 0 AND expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS queue_tickets (
    lane TEXT NOT NULL, priority INTEGER NOT NULL, next_ticket INTEGER NOT NULL, PRIMARY KEY (lane, priority)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS queue_holes (
    lane TEXT NOT NULL, priority INTEGER NOT NULL, ticket INTEGER NOT NULL,
    PRIMARY KEY (lane, priority, ticket)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS job_logs (
    request_id TEXT NOT NULL, seq INTEGER PRIMARY KEY AUTOINCREMENT,
    timestamp REAL NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS job_logs_request ON job_logs(request_id, seq);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    delivery_id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL, url TEXT NOT NULL, user_id TEXT NOT NULL, body BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL, state TEXT NOT NULL DEFAULT 'pending',
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS webhook_due ON webhook_deliveries(next_attempt_at) WHERE state = 'pending';
"""

MAX_ATTEMPTS = 3  # a request whose worker died this often is failed, not retried forever


class DataDirInUse(RuntimeError):
    pass


class SQLiteJobStore:
    def __init__(self, path: Path) -> None:
        self._path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # The embedded store assumes it is the only process using this file: hold a lock for our lifetime.
        self._lock_file = open(path.with_suffix(".lock"), "w")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise DataDirInUse(f"{path} is in use by another kontextd process") from None
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._connection().executescript(SCHEMA)

    # -- plumbing --------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
            # FULL: a request we answered 200 to survives a power cut, not only a crash.
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("PRAGMA busy_timeout=10000")
            self._local.connection = connection
            with self._connections_lock:
                self._connections.append(connection)
        return connection

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        connection = self._connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def close(self) -> None:
        with self._connections_lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
        self._lock_file.close()

    # -- queue arithmetic ------------------------------------------------------------------------

    @staticmethod
    def _head(connection: sqlite3.Connection, lane: str, priority: int) -> int | None:
        row = connection.execute(
            "SELECT min(ticket) FROM jobs WHERE state = 'IN_QUEUE' AND lane = ? AND priority = ?",
            (lane, priority),
        ).fetchone()
        return row[0]

    @staticmethod
    def _holes_between(connection: sqlite3.Connection, lane: str, priority: int, low: int, high: int) -> int:
        return connection.execute(
            "SELECT count(*) FROM queue_holes WHERE lane = ? AND priority = ? AND ticket > ? AND ticket < ?",
            (lane, priority, low, high),
        ).fetchone()[0]

    def _queued_before(self, connection: sqlite3.Connection, lane: str, priority: int, ticket: int) -> int:
        head = self._head(connection, lane, priority)
        if head is None or head >= ticket:
            return 0
        return (ticket - head) - self._holes_between(connection, lane, priority, head, ticket)

    def _position(self, connection: sqlite3.Connection, lane: str, priority: int, ticket: int) -> int:
        ahead = self._queued_before(connection, lane, priority, ticket)
        for level in range(Priority.RETRY, priority):
            row = connection.execute(
                "SELECT next_ticket FROM queue_tickets WHERE lane = ? AND priority = ?", (lane, level)
            ).fetchone()
            if row is not None:
                ahead += self._queued_before(connection, lane, level, row[0])
        return ahead

    @staticmethod
    def _enqueue(connection: sqlite3.Connection, request_id: str, lane: str, priority: int) -> int:
        ticket = connection.execute(
            "INSERT INTO queue_tickets (lane, priority, next_ticket) VALUES (?, ?, 1) "
            "ON CONFLICT (lane, priority) DO UPDATE SET next_ticket = next_ticket + 1"
            " RETURNING next_ticket - 1",
            (lane, priority),
        ).fetchone()[0]
        ticket = ticket if ticket else 0
        connection.execute(
            "UPDATE jobs SET state = 'IN_QUEUE', priority = ?, ticket = ? WHERE request_id = ?",
            (priority, ticket, request_id),
        )
        return ticket

    @staticmethod
    def _leave_queue(connection: sqlite3.Connection, row: sqlite3.Row) -> None:
        connection.execute(
            "INSERT OR IGNORE INTO queue_holes (lane, priority, ticket) VALUES (?, ?, ?)",
            (row["lane"], row["priority"], row["ticket"]),
        )

    # -- jobs ------------------------------------------------------------------------------------

    def submit(self, job: NewJob) -> int:
        with self._write() as connection:
            connection.execute(
                "INSERT INTO jobs (request_id, gateway_request_id, app_id, owner, lane, input_json, state,"
                " priority, ticket, created_at, start_deadline, no_retry, webhook_url, output_ttl)"
                " VALUES (?, ?, ?, ?, ?, ?, 'IN_QUEUE', ?, 0, ?, ?, ?, ?, ?)",
                (
                    job.request_id,
                    job.gateway_request_id,
                    job.app_id,
                    job.owner,
                    job.lane,
                    json.dumps(job.input),
                    int(job.priority),
                    time.time(),
                    job.start_deadline,
                    int(job.no_retry),
                    job.webhook_url,
                    job.output_ttl_seconds,
                ),
            )
            ticket = self._enqueue(connection, job.request_id, job.lane, int(job.priority))
            return self._position(connection, job.lane, int(job.priority), ticket)

    def get(self, request_id: str, owner: str | None = None) -> Job | None:
        row = self._connection().execute("SELECT * FROM jobs WHERE request_id = ?", (request_id,)).fetchone()
        if row is None or (owner is not None and row["owner"] != owner):
            return None
        return _job(row)

    def summary(self, request_id: str, owner: str | None = None) -> JobSummary | None:
        row = (
            self._connection()
            .execute(
                "SELECT request_id, app_id, owner, state, outcome_json, output_expired FROM jobs"
                " WHERE request_id = ?",
                (request_id,),
            )
            .fetchone()
        )
        if row is None or (owner is not None and row["owner"] != owner):
            return None
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

    def queue_position(self, request_id: str) -> int | None:
        connection = self._connection()
        connection.execute("BEGIN")  # one snapshot: the reads below must not straddle another commit
        try:
            row = connection.execute(
                "SELECT lane, priority, ticket, state FROM jobs WHERE request_id = ?", (request_id,)
            ).fetchone()
            if row is None or row["state"] != State.IN_QUEUE:
                return None
            return self._position(connection, row["lane"], row["priority"], row["ticket"])
        finally:
            connection.execute("COMMIT")

    def claim(self, worker_id: str, lease_seconds: float, now: float, lane: str = "local") -> Job | None:
        with self._write() as connection:
            while True:
                # Only what deciding and timing out need: the input, possibly megabytes, is read once below.
                row = connection.execute(
                    "SELECT request_id, gateway_request_id, owner, lane, priority, ticket, start_deadline,"
                    " webhook_url, output_ttl FROM jobs WHERE state = 'IN_QUEUE' AND lane = ?"
                    " ORDER BY priority, ticket LIMIT 1",
                    (lane,),
                ).fetchone()
                if row is None:
                    return None
                self._leave_queue(connection, row)
                if row["start_deadline"] is not None and row["start_deadline"] < now:
                    self._finish(connection, row, outcomes.timed_out(), now)
                    continue
                claimed = connection.execute(
                    "UPDATE jobs SET state = 'IN_PROGRESS', worker_id = ?, lease_expires_at = ?,"
                    " started_at = ?, attempts = attempts + 1 WHERE request_id = ? RETURNING *",
                    (worker_id, now + lease_seconds, now, row["request_id"]),
                ).fetchone()
                return _job(claimed)

    def renew_lease(self, request_id: str, worker_id: str, lease_seconds: float, now: float) -> bool:
        with self._write() as connection:
            cursor = connection.execute(
                "UPDATE jobs SET lease_expires_at = ? WHERE request_id = ? AND worker_id = ?"
                " AND state = 'IN_PROGRESS'",
                (now + lease_seconds, request_id, worker_id),
            )
            return cursor.rowcount == 1

    def complete(self, request_id: str, outcome: Outcome, now: float, worker_id: str | None = None) -> bool:
        with self._write() as connection:
            row = connection.execute("SELECT * FROM jobs WHERE request_id = ?", (request_id,)).fetchone()
            if row is None or row["state"] == State.COMPLETED:
                return False
            if worker_id is not None and (row["state"] != State.IN_PROGRESS or row["worker_id"] != worker_id):
                return False
            if row["state"] == State.IN_QUEUE:
                self._leave_queue(connection, row)
            self._finish(connection, row, outcome, now)
            return True

    def _finish(self, connection: sqlite3.Connection, row: sqlite3.Row, outcome: Outcome, now: float) -> None:
        expires_at = now + row["output_ttl"] if row["output_ttl"] is not None else None
        connection.execute(
            "UPDATE jobs SET state = 'COMPLETED', completed_at = ?, outcome_json = ?, result_json = ?,"
            " expires_at = ?,"
            " worker_id = NULL, lease_expires_at = NULL WHERE request_id = ?",
            (
                now,
                json.dumps(_outcome_fields(outcome)),
                json.dumps(outcome.body),
                expires_at,
                row["request_id"],
            ),
        )
        if row["webhook_url"]:
            connection.execute(
                "INSERT INTO webhook_deliveries (request_id, url, user_id, body, next_attempt_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    row["request_id"],
                    row["webhook_url"],
                    row["owner"],
                    outcomes.webhook_body(row["request_id"], row["gateway_request_id"], outcome),
                    now,
                ),
            )

    def cancel(self, request_id: str, owner: str, now: float) -> CancelResult:
        with self._write() as connection:
            row = connection.execute("SELECT * FROM jobs WHERE request_id = ?", (request_id,)).fetchone()
            if row is None or row["owner"] != owner:
                return CancelResult.NOT_FOUND
            if row["state"] == State.COMPLETED:
                return CancelResult.ALREADY_COMPLETED
            if row["state"] == State.IN_QUEUE:
                self._leave_queue(connection, row)
                self._finish(connection, row, outcomes.cancelled(), now)
                return CancelResult.CANCELLED
            connection.execute("UPDATE jobs SET cancel_requested = 1 WHERE request_id = ?", (request_id,))
            return CancelResult.REQUESTED

    def cancel_requested(self, request_id: str) -> bool:
        row = (
            self._connection()
            .execute("SELECT cancel_requested FROM jobs WHERE request_id = ?", (request_id,))
            .fetchone()
        )
        return bool(row and row[0])

    # -- logs ------------------------------------------------------------------------------------

    def append_log(self, request_id: str, message: str, level: str, now: float) -> None:
        with self._write() as connection:
            connection.execute(
                "INSERT INTO job_logs (request_id, timestamp, level, message) VALUES (?, ?, ?, ?)",
                (request_id, now, level, message),
            )

    def logs(self, request_id: str) -> list[LogLine]:
        rows = self._connection().execute(
            "SELECT message, level, timestamp FROM job_logs WHERE request_id = ? ORDER BY seq", (request_id,)
        )
        return [LogLine(row["message"], row["level"], row["timestamp"]) for row in rows]

    # -- housekeeping ----------------------------------------------------------------------------

    def expire_unstarted(self, now: float) -> int:
        with self._write() as connection:
            rows = connection.execute(
                "SELECT * FROM jobs WHERE state = 'IN_QUEUE' AND start_deadline IS NOT NULL"
                " AND start_deadline < ?",
                (now,),
            ).fetchall()
            for row in rows:
                self._leave_queue(connection, row)
                self._finish(connection, row, outcomes.timed_out(), now)
            self._prune_holes(connection)
            return len(rows)

    def _prune_holes(self, connection: sqlite3.Connection) -> None:
        for lane, priority in connection.execute("SELECT lane, priority FROM queue_tickets").fetchall():
            head = self._head(connection, lane, priority)
            if head is None:
                connection.execute(
                    "DELETE FROM queue_holes WHERE lane = ? AND priority = ?", (lane, priority)
                )
            else:
                connection.execute(
                    "DELETE FROM queue_holes WHERE lane = ? AND priority = ? AND ticket < ?",
                    (lane, priority, head),
                )

    def recover_abandoned(self, now: float) -> int:
        with self._write() as connection:
            rows = connection.execute(
                "SELECT * FROM jobs WHERE state = 'IN_PROGRESS' AND lease_expires_at < ?", (now,)
            ).fetchall()
            for row in rows:
                self._requeue_or_fail(connection, row, now)
            return len(rows)

    def recover_after_restart(self, now: float) -> int:
        """Every running job belongs to a dead process: this store is single-process (see the lock)."""
        with self._write() as connection:
            rows = connection.execute("SELECT * FROM jobs WHERE state = 'IN_PROGRESS'").fetchall()
            for row in rows:
                self._requeue_or_fail(connection, row, now)
            return len(rows)

    def move_to_lanes(self, lanes: Mapping[str, str]) -> int:
        """Move queued jobs whose app is now routed to another backend into that backend's lane, keeping
        their priority and order: after a routing change no accepted request waits for workers that no
        longer exist. Returns how many moved."""
        moved = 0
        with self._write() as connection:
            for app_id, lane in lanes.items():
                rows = connection.execute(
                    "SELECT * FROM jobs WHERE state = 'IN_QUEUE' AND app_id = ? AND lane != ?"
                    " ORDER BY priority, ticket",
                    (app_id, lane),
                ).fetchall()
                for row in rows:
                    self._leave_queue(connection, row)
                    connection.execute(
                        "UPDATE jobs SET lane = ? WHERE request_id = ?", (lane, row["request_id"])
                    )
                    self._enqueue(connection, row["request_id"], lane, row["priority"])
                moved += len(rows)
            self._prune_holes(connection)
        return moved

    def _requeue_or_fail(self, connection: sqlite3.Connection, row: sqlite3.Row, now: float) -> None:
        if row["cancel_requested"]:
            self._finish(connection, row, outcomes.cancelled(), now)
        elif row["no_retry"]:
            self._finish(
                connection,
                row,
                outcomes.internal_error("The worker stopped; not retried (x-fal-no-retry)"),
                now,
            )
        elif row["attempts"] >= MAX_ATTEMPTS:
            self._finish(
                connection, row, outcomes.internal_error(f"The worker stopped {MAX_ATTEMPTS} times"), now
            )
        else:
            connection.execute(
                # It did start in time once: the start deadline no longer applies to the re-run.
                "UPDATE jobs SET worker_id = NULL, lease_expires_at = NULL, started_at = NULL,"
                " start_deadline = NULL WHERE request_id = ?",
                (row["request_id"],),
            )
            self._enqueue(connection, row["request_id"], row["lane"], Priority.RETRY)
            connection.execute(
                "INSERT INTO job_logs (request_id, timestamp, level, message) VALUES (?, ?, 'WARN', ?)",
                (row["request_id"], now, "The worker running this request stopped; it was queued again"),
            )

    def expired_outputs(self, now: float, limit: int) -> list[tuple[str, Sequence[str]]]:
        rows = self._connection().execute(
            "SELECT request_id, outcome_json FROM jobs WHERE output_expired = 0 AND expires_at IS NOT NULL"
            " AND expires_at < ? LIMIT ?",
            (now, limit),
        )
        return [(row[0], json.loads(row[1])["output_keys"]) for row in rows]

    def mark_output_expired(self, request_id: str) -> None:
        with self._write() as connection:
            connection.execute(
                "UPDATE jobs SET output_expired = 1, result_json = '{}' WHERE request_id = ?",
                (request_id,),
            )

    # -- webhooks --------------------------------------------------------------------------------

    def due_webhooks(self, now: float, limit: int) -> list[WebhookDelivery]:
        rows = self._connection().execute(
            "SELECT * FROM webhook_deliveries WHERE state = 'pending' AND next_attempt_at <= ?"
            " ORDER BY next_attempt_at LIMIT ?",
            (now, limit),
        )
        return [
            WebhookDelivery(
                row["delivery_id"],
                row["request_id"],
                row["url"],
                row["user_id"],
                row["body"],
                row["attempts"],
            )
            for row in rows
        ]

    def webhook_attempted(
        self, delivery_id: int, delivered: bool, next_attempt_at: float | None, error: str
    ) -> None:
        state = "delivered" if delivered else ("pending" if next_attempt_at is not None else "failed")
        with self._write() as connection:
            connection.execute(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, state = ?, next_attempt_at = ?,"
                " last_error = ? WHERE delivery_id = ?",
                (state, next_attempt_at, error or None, delivery_id),
            )


def _outcome_fields(outcome: Outcome) -> dict[str, Any]:
    return {
        "status_code": outcome.status_code,
        "error": outcome.error,
        "error_type": outcome.error_type,
        "metrics": outcome.metrics,
        "output_keys": list(outcome.output_keys),
        "served_by": outcome.served_by,
    }


def _job(row: sqlite3.Row) -> Job:
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
    )
