"""What the two SQL job stores do alike, written once: every JobStore method whose decisions about a job's
row do not depend on how a store hands out tickets, counts queue positions, claims or coordinates processes.

`SqlJobStore` is the base of `SQLiteJobStore` (kontextd/jobs/sqlite.py) and `PostgresJobStore`
(kontextd/jobs/postgres.py). It reads and writes through what each store provides: `_read()` (a
connection outside any transaction), `_write()` (one write transaction, as a `Transaction`), `_write_one()`
(one statement, atomic by itself: PostgreSQL saves the transaction's round trips), `_enqueue()` and
`_prune_holes()` (each store's queue arithmetic). Its SQL is `kontextd.jobs.statements`', in the store's
dialect; the lifecycle rules it applies are `kontextd.jobs.lifecycle`'s.

Every write that changes what a status poll reads (a job's state, logs, cancel flag, its record) tells its
transaction `changed(request_id)`: the store drops those polls from its cache at the commit, and PostgreSQL
announces them to the other nodes with it.
"""

import abc
import contextlib
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from kontextd.jobs import lifecycle, outcomes, rows, statements
from kontextd.jobs.model import (
    CancelResult,
    DueWebhook,
    Job,
    JobSummary,
    LogLine,
    Outcome,
    Priority,
    QueueDepth,
    Release,
    State,
    Usage,
    WebhookDelivery,
)


class Transaction:
    """One connection inside one write transaction, and what it changed, each job and lane once, in order:
    for the poll cache at the commit and, on a shared store, the announcements sent with it."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self._jobs: dict[str, None] = {}
        self._lanes: dict[str, None] = {}

    def execute(self, query: Any, params: Any = None) -> Any:
        """The connection's cursor for `query` (sqlite3's or psycopg's: both fetchone() and fetchall())."""
        if params is None:
            return self.connection.execute(query)
        return self.connection.execute(query, params)

    def changed(self, request_id: str) -> None:
        self._jobs[request_id] = None

    def queued_in(self, lane: str) -> None:
        self._lanes[lane] = None

    @property
    def changed_jobs(self) -> list[str]:
        return list(self._jobs)

    @property
    def queued_lanes(self) -> list[str]:
        return list(self._lanes)


class SqlJobStore(abc.ABC):
    shared: bool  # see JobStore.shared
    _sql: statements.Statements  # this store's dialect of the shared statements
    # Monotonic time the database was last found out of reach (PostgreSQL notes it; a local file never is).
    _unreachable_at: float = -math.inf

    # -- what each store provides ----------------------------------------------------------------------

    @abc.abstractmethod
    def _read(self) -> contextlib.AbstractContextManager[Any]:
        """A connection for reads outside any transaction: each statement sees the latest commit."""

    @abc.abstractmethod
    def _write(self) -> contextlib.AbstractContextManager[Transaction]:
        """One write transaction: all of it commits, or none of it."""

    @abc.abstractmethod
    def _write_one(self) -> contextlib.AbstractContextManager[Any]:
        """A connection for writes of one statement each, every one atomic by itself, changing nothing a
        status poll reads (leases, checkpoints, webhook tries, secrets)."""

    @abc.abstractmethod
    def _enqueue(self, transaction: Transaction, request_id: str, lane: str, priority: int) -> int:
        """Queue an existing job at the tail of (lane, priority) with that level's next ticket; returns it.
        Tells the transaction the job changed and work was queued in the lane."""

    @abc.abstractmethod
    def _prune_holes(self, transaction: Transaction) -> None:
        """Forget the holes no position counts any more (those behind the head of each level)."""

    def _leave_queue(self, transaction: Transaction, row: rows.Row) -> None:
        """The queued job in `row` leaves its level out of order: a hole, so positions behind it move up."""
        transaction.execute(self._sql.leave_queue, (row["lane"], row["priority"], row["ticket"]))

    # -- jobs ------------------------------------------------------------------------------------------

    def get(self, request_id: str, owner: str | None = None) -> Job | None:
        row = self._owned(self._sql.job, request_id, owner)
        return None if row is None else rows.job(row)

    def summary(self, request_id: str, owner: str | None = None) -> JobSummary | None:
        row = self._owned(self._sql.summary, request_id, owner)
        return None if row is None else rows.summary(row)

    def _owned(self, statement: str, request_id: str, owner: str | None) -> rows.Row | None:
        """The job's row as `statement` reads it; None when unknown or (with `owner`) someone else's."""
        with self._read() as connection:
            row = connection.execute(statement, (request_id,)).fetchone()
        if row is None or (owner is not None and row["owner"] != owner):
            return None
        return row

    def claim(
        self,
        worker_id: str,
        lease_seconds: float,
        now: float,
        lane: str = "local",
        prefer: Collection[str] = (),
    ) -> Job | None:
        """The head of the lane (on a shared store, the first no other node holds: a concurrent claimer
        skips past the row locked here instead of waiting for the commit), or a job close behind it that
        the worker is preferred for, started under a lease; heads whose start deadline passed are timed
        out on the way, in the same transaction."""
        with self._write() as transaction:
            while True:
                row = transaction.execute(self._sql.queue_head, (lane,)).fetchone()
                if row is None:
                    return None
                if row["start_deadline"] is not None and row["start_deadline"] < now:
                    self._leave_queue(transaction, row)
                    self._finish(transaction, row, outcomes.timed_out(), now)
                    continue
                if prefer and row["affinity"] not in prefer:
                    row = self._preferred(transaction, row, prefer, now) or row
                self._leave_queue(transaction, row)
                claimed = transaction.execute(
                    self._sql.start, (worker_id, now + lease_seconds, now, row["request_id"])
                ).fetchone()
                transaction.changed(row["request_id"])
                return rows.job(claimed)

    def _preferred(
        self, transaction: Transaction, head: rows.Row, prefer: Collection[str], now: float
    ) -> rows.Row | None:
        """A job of the head's level, at most lifecycle.AFFINITY_WINDOW tickets behind it, whose affinity
        is one of `prefer`, and still in time to start; None: take the head."""
        ticket = head["ticket"]
        window = (head["lane"], head["priority"], ticket, ticket + lifecycle.AFFINITY_WINDOW)
        affinities = self._sql.dialect.bind_list(list(prefer))
        row = transaction.execute(self._sql.preferred_head, (*window, affinities)).fetchone()
        if row is None or (row["start_deadline"] is not None and row["start_deadline"] < now):
            return None
        return row

    def renew_lease(self, request_id: str, worker_id: str, lease_seconds: float, now: float) -> bool:
        # One statement, atomic by itself. Not announced: a heartbeat changes nothing a waiter looks at.
        with self._write_one() as connection:
            cursor = connection.execute(self._sql.renew_lease, (now + lease_seconds, request_id, worker_id))
            return cursor.rowcount == 1

    def set_preview(self, request_id: str, worker_id: str, preview: str) -> bool:
        with self._write() as transaction:
            cursor = transaction.execute(self._sql.set_preview, (preview, request_id, worker_id))
            if cursor.rowcount != 1:
                return False
            transaction.changed(request_id)  # announced: a status stream asking for previews wakes
            return True

    def preview(self, request_id: str) -> str | None:
        with self._read() as connection:
            row = connection.execute(self._sql.preview, (request_id,)).fetchone()
        return None if row is None else row["preview"]

    def checkpoint(self, request_id: str, worker_id: str, name: str, value: str) -> bool:
        with self._write_one() as connection:
            cursor = connection.execute(self._sql.checkpoint, (name, value, request_id, worker_id))
            return cursor.rowcount == 1

    def complete(self, request_id: str, outcome: Outcome, now: float, worker_id: str | None = None) -> bool:
        with self._write() as transaction:
            row = self._locked(transaction, request_id)
            if row is None or row["state"] == State.COMPLETED:
                return False
            if worker_id is not None and (row["state"] != State.IN_PROGRESS or row["worker_id"] != worker_id):
                return False
            if row["state"] == State.IN_QUEUE:
                self._leave_queue(transaction, row)
            self._finish(transaction, row, outcome, now)
            return True

    def _locked(self, transaction: Transaction, request_id: str) -> rows.Row | None:
        """The job's control columns, its row held to the commit (PostgreSQL: locked, waiting up to the lock
        timeout for a node that holds it; SQLite: the one writer's), so what we decide on cannot change."""
        return transaction.execute(self._sql.control, (request_id,)).fetchone()

    def _finish(self, transaction: Transaction, row: rows.Row, outcome: Outcome, now: float) -> None:
        """End a job (its row held by us) and queue its webhook in the same transaction."""
        transaction.execute(self._sql.finish, statements.finish_params(row["request_id"], outcome, now))
        if row["webhook_url"]:
            transaction.execute(self._sql.queue_webhook, statements.webhook_params(row, outcome, now))
        transaction.changed(row["request_id"])

    def cancel(self, request_id: str, owner: str, now: float) -> CancelResult:
        with self._write() as transaction:
            row = self._locked(transaction, request_id)
            if row is None or row["owner"] != owner:
                return CancelResult.NOT_FOUND
            if row["state"] == State.COMPLETED:
                return CancelResult.ALREADY_COMPLETED
            if row["state"] == State.IN_QUEUE:
                self._leave_queue(transaction, row)
                self._finish(transaction, row, outcomes.cancelled(), now)
                return CancelResult.CANCELLED
            transaction.execute(self._sql.request_cancel, (request_id,))
            transaction.changed(request_id)
            return CancelResult.REQUESTED

    def cancel_requested(self, request_id: str) -> bool:
        with self._read() as connection:
            row = connection.execute(self._sql.cancel_requested, (request_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    # -- logs ------------------------------------------------------------------------------------------

    def append_log(self, request_id: str, message: str, level: str, now: float) -> None:
        with self._write() as transaction:
            transaction.execute(self._sql.append_log, (request_id, now, level, self._sql.text(message)))
            transaction.changed(request_id)

    def logs(self, request_id: str) -> list[LogLine]:
        with self._read() as connection:
            found = connection.execute(self._sql.logs, (request_id,)).fetchall()
        return [rows.log_line(row) for row in found]

    # -- stopping short and recovering -----------------------------------------------------------------

    def expire_unstarted(self, now: float) -> int:
        with self._write() as transaction:
            # On a shared store a row another node holds is being claimed or ended by it: skipped.
            found = transaction.execute(self._sql.unstarted, (now,)).fetchall()
            for row in found:
                self._leave_queue(transaction, row)
                self._finish(transaction, row, outcomes.timed_out(), now)
            self._prune_holes(transaction)
            return len(found)

    def recover_abandoned(self, now: float, settle_seconds: float = 0.0) -> int:
        # An outage stops every heartbeat at once: leases that lapsed during it belong to live workers,
        # which renew them within a third of a lease once the database is back. Wait that long first.
        if time.monotonic() - self._unreachable_at < settle_seconds:
            return 0
        with self._write() as transaction:
            # Several nodes may sweep at once: each lapsed lease is recovered by exactly one of them.
            found = transaction.execute(self._sql.lapsed, (now,)).fetchall()
            for row in found:
                self._requeue_or_end(transaction, row, now, lifecycle.LEASE_LAPSED)
            return len(found)

    def release(self, request_id: str, worker_id: str, reason: Release, now: float) -> State | None:
        with self._write() as transaction:
            row = self._locked(transaction, request_id)
            if row is None or row["state"] != State.IN_PROGRESS or row["worker_id"] != worker_id:
                return None
            return self._requeue_or_end(transaction, row, now, lifecycle.RELEASES[reason])

    def queue_depths(self) -> dict[str, QueueDepth]:
        with self._read() as connection:
            found = connection.execute(self._sql.queue_depths).fetchall()
        return {str(row["lane"]): QueueDepth(int(row["depth"]), float(row["oldest"])) for row in found}

    def move_to_lanes(self, lanes: Mapping[str, str]) -> int:
        """Move queued jobs whose app is now routed to another backend into that backend's lane, keeping
        their priority and order: after a routing change no accepted request waits for workers that no
        longer exist. A job another node holds is leaving the queue: skipped."""
        moved = 0
        with self._write() as transaction:
            for app_id, lane in lanes.items():
                found = transaction.execute(self._sql.misrouted, (app_id, lane)).fetchall()
                for row in found:
                    self._leave_queue(transaction, row)
                    self._enqueue(transaction, row["request_id"], lane, row["priority"])
                moved += len(found)
            self._prune_holes(transaction)
        return moved

    def _requeue_or_end(
        self, transaction: Transaction, row: rows.Row, now: float, why: lifecycle.Requeue
    ) -> State:
        """Put a running job (its row held by us) back at the head of its lane, or end it when it must not
        run again; what stopped it is counted as `why` says."""
        count = row[why.counter] + 1 if why.counter else 0
        if why.counter:
            transaction.execute(self._sql.count[why.counter], (count, row["request_id"]))
        ending = why.ending(count, bool(row["cancel_requested"]), bool(row["no_retry"]))
        if ending is not None:
            self._finish(transaction, row, ending, now)
            return State.COMPLETED
        transaction.execute(self._sql.unassign, (row["request_id"],))
        self._enqueue(transaction, row["request_id"], row["lane"], Priority.RETRY)
        transaction.execute(self._sql.requeued_log, (row["request_id"], now, why.requeued))
        return State.IN_QUEUE

    # -- outputs and records ---------------------------------------------------------------------------

    def expired_outputs(self, now: float, limit: int) -> list[tuple[str, Sequence[str]]]:
        with self._read() as connection:
            found = connection.execute(self._sql.expired_outputs, (now, limit)).fetchall()
        return [rows.expired_output(row) for row in found]

    def mark_output_expired(self, request_id: str) -> None:
        """Leave a tombstone: state and how it ended (status still answers, the result says 410); the
        input and result bodies and the logs go."""
        with self._write() as transaction:
            transaction.execute(self._sql.mark_output_expired, (request_id,))
            transaction.execute(self._sql.drop_logs, (request_id,))
            transaction.changed(request_id)

    def prune_records(self, expired_before: float, limit: int) -> int:
        with self._write() as transaction:
            found = transaction.execute(self._sql.prunable, (expired_before, limit)).fetchall()
            names = self._sql.dialect.bind_list([row["request_id"] for row in found])
            for delete in self._sql.prune:
                transaction.execute(delete, (names,))
            for row in found:
                transaction.changed(row["request_id"])  # gone: a status poll now answers 404
            return len(found)

    # -- uploads ---------------------------------------------------------------------------------------

    def add_upload(self, key: str, owner: str, expires_at: float) -> None:
        # One statement, atomic by itself; no status poll reads uploads.
        with self._write_one() as connection:
            connection.execute(self._sql.add_upload, (key, owner, expires_at))

    def upload_owner(self, key: str, now: float) -> str | None:
        with self._read() as connection:
            row = connection.execute(self._sql.upload_owner, (key, now)).fetchone()
        return None if row is None else str(row["owner"])

    def expired_uploads(self, now: float, limit: int) -> list[str]:
        with self._read() as connection:
            found = connection.execute(self._sql.expired_uploads, (now, limit)).fetchall()
        return [str(row["file_key"]) for row in found]

    # -- usage -----------------------------------------------------------------------------------------

    def add_usage(self, usage: Usage) -> None:
        # One statement, atomic by itself: concurrent workers add to the same row without losing a count.
        figures = (usage.requests, usage.images, usage.megapixels, usage.gpu_seconds)
        with self._write_one() as connection:
            connection.execute(self._sql.add_usage, (usage.owner, usage.app_id, usage.day, *figures))

    def usage(self, since: str, until: str, owner: str | None = None) -> list[Usage]:
        with self._read() as connection:
            if owner is None:
                found = connection.execute(self._sql.usage, (since, until)).fetchall()
            else:
                found = connection.execute(self._sql.usage_of, (since, until, owner)).fetchall()
        return [
            Usage(
                str(row["owner"]),
                str(row["app_id"]),
                str(row["day"]),
                int(row["requests"]),
                int(row["images"]),
                float(row["megapixels"]),
                float(row["gpu_seconds"]),
            )
            for row in found
        ]

    def forget_uploads(self, keys: Collection[str]) -> None:
        if not keys:
            return
        with self._write_one() as connection:
            connection.execute(self._sql.forget_uploads, (self._sql.dialect.bind_list(list(keys)),))

    # -- webhooks --------------------------------------------------------------------------------------

    def due_webhooks(self, now: float, limit: int, after: DueWebhook | None = None) -> list[DueWebhook]:
        with self._read() as connection:
            if after is None:
                cursor = connection.execute(self._sql.due_webhooks, (now, limit))
            else:
                params = (now, after.due_at, after.delivery_id, limit)
                cursor = connection.execute(self._sql.due_webhooks_after, params)
            return [rows.due_webhook(row) for row in cursor.fetchall()]

    def start_webhook(self, delivery_id: int, now: float, deadline: float) -> WebhookDelivery | None:
        # One conditional UPDATE: of nodes racing for the same try, the first takes the row lock and moves
        # the deadline on; the others re-check the condition on its new version and find it no longer due.
        with self._write_one() as connection:
            row = connection.execute(self._sql.start_webhook, (deadline, delivery_id, now)).fetchone()
        return None if row is None else rows.delivery(row)

    def webhook_attempted(
        self, delivery_id: int, delivered: bool, next_attempt_at: float | None, error: str
    ) -> None:
        state = statements.attempt_state(delivered, next_attempt_at)
        with self._write_one() as connection:
            # A delivery that already ended stays as it ended: a late report must not count a try twice.
            params = (state, next_attempt_at, self._sql.text(error) or None, delivery_id)
            connection.execute(self._sql.webhook_attempted, params)

    def release_webhooks(self, now: float, delivery_ids: Collection[int] | None = None) -> int:
        """Without ids, a shared store releases nothing (returns 0): a delivery in flight there may be a
        live node's, mid-send, and releasing it would have it sent twice at once. One whose sender died is
        due again anyway once its send deadline lapses (due_webhooks lists those)."""
        with self._write_one() as connection:
            if delivery_ids is not None:
                params = (now, self._sql.dialect.bind_list(delivery_ids))
                return connection.execute(self._sql.release_named_webhooks, params).rowcount
            if self.shared:
                return 0
            return connection.execute(self._sql.release_webhooks, (now,)).rowcount

    def webhook_deliveries(self, request_id: str) -> list[WebhookDelivery]:
        with self._read() as connection:
            found = connection.execute(self._sql.webhook_deliveries, (request_id,)).fetchall()
        return [rows.delivery(row) for row in found]

    # -- secrets ---------------------------------------------------------------------------------------

    def secret(self, name: str, make: Callable[[], bytes]) -> bytes:
        """The first process to keep `name` wins: a racing one's INSERT does nothing (on PostgreSQL after
        waiting for the winner's commit), and it reads the winner's bytes."""
        with self._write_one() as connection:
            found = connection.execute(self._sql.secret, (name,)).fetchone()
            if found is None:
                connection.execute(self._sql.keep_secret, (name, make()))
                found = connection.execute(self._sql.secret, (name,)).fetchone()
        assert found is not None
        return bytes(found["value"])
