"""The embedded job store: one SQLite file in WAL mode, owned by one server process.

Each backend (the local model, an upstream API) has its own queue lane, served by its own workers.
Queue positions are exact without counting the queue: each priority level of a lane hands out dense
tickets, and a job's position is its distance from the head of its level, minus the jobs that left out of
order ("holes"), plus the length of the lane's levels ahead of it. Every lookup is an index seek.

Connections come from a small pool, lent for one operation at a time: threads come and go (the API's
threadpool retires idle ones), the number of open database handles does not.
"""

import contextlib
import fcntl
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from kontextd.jobs import lifecycle, rows, statements
from kontextd.jobs.model import (
    NewJob,
    Polled,
    Priority,
    State,
)
from kontextd.jobs.poll_cache import PollCache
from kontextd.jobs.sql_store import SqlJobStore, Transaction
from kontextd.jobs.store import StoreUnavailable

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
CREATE INDEX IF NOT EXISTS jobs_tombstones ON jobs(expires_at) WHERE output_expired = 1;
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
-- state: pending (next try at next_attempt_at), sending (a try in flight; next_attempt_at is its deadline,
-- after which the sender is presumed dead and the delivery is due again), delivered, failed (given up).
DROP INDEX IF EXISTS webhook_due;  -- superseded by webhook_due_or_lapsed: in-flight rows can fall due too
CREATE INDEX IF NOT EXISTS webhook_due_or_lapsed ON webhook_deliveries(next_attempt_at)
    WHERE state IN ('pending', 'sending');
CREATE INDEX IF NOT EXISTS webhook_sending ON webhook_deliveries(delivery_id) WHERE state = 'sending';
-- Pruning a request's record deletes its finished deliveries with it.
CREATE INDEX IF NOT EXISTS webhook_deliveries_request ON webhook_deliveries(request_id);
-- Deployment-wide secrets (the webhook signing key), made once and kept.
CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
-- Files uploaded through fal's storage API: whose each is, and until when (JobStore.add_upload). A table of
-- its own, so IF NOT EXISTS brings an older database to it as well.
CREATE TABLE IF NOT EXISTS uploads (
    file_key TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS uploads_expiry ON uploads(expires_at);
-- What each key's completed requests used, per endpoint and day (JobStore.add_usage): kept apart from the
-- jobs, which are pruned.
CREATE TABLE IF NOT EXISTS usage (
    owner TEXT NOT NULL, app_id TEXT NOT NULL, day TEXT NOT NULL, requests INTEGER NOT NULL,
    images INTEGER NOT NULL, megapixels REAL NOT NULL, gpu_seconds REAL NOT NULL,
    PRIMARY KEY (owner, app_id, day)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_day ON usage(day);
"""

# Columns added since the first release, as (table, column, definition). SCHEMA above is the first
# release's tables, so an old database and a new one are brought to the same shape by the same ALTERs.
# Append only; definitions need a constant default (SQLite's ALTER TABLE ADD COLUMN rule).
MIGRATIONS: list[tuple[str, str, str]] = [
    # Times its worker was lost while this process ran (a lapsed lease): the request's own doing.
    ("jobs", "failures", "INTEGER NOT NULL DEFAULT 0"),
    # Times the server process died under it (found at start-up): not its fault, but capped.
    ("jobs", "interruptions", "INTEGER NOT NULL DEFAULT 0"),
    # Times its images could not be stored (disk full): re-run once space returns, up to a cap.
    ("jobs", "storage_failures", "INTEGER NOT NULL DEFAULT 0"),
    # What a run kept for a re-run to resume (JobStore.checkpoint), a JSON object; NULL once it ended.
    ("jobs", "checkpoints_json", "TEXT"),
    # What a worker that ran such a job before is preferred for (JobStore.claim's `prefer`).
    ("jobs", "affinity", "TEXT"),
    # The running job's latest preview, a small JPEG data URI (JobStore.set_preview); NULL otherwise.
    ("jobs", "preview", "TEXT"),
]

_SQL = statements.Statements(statements.SQLITE)  # what this store runs as the PostgreSQL one does
# The job's row at submit, ticket 0 until _enqueue hands it one.
_SUBMIT = f"INSERT INTO jobs ({statements.NEW_JOB_COLUMNS}) VALUES ({_SQL.new_job_values('0')})"

POOL_SIZE = 8  # open connections at most, whatever the number of threads: one writes, the others read
WAIT_SECONDS = 10.0  # for the write turn or a free connection; then the store is "busy" (503)


class DataDirInUse(RuntimeError):
    pass


def _unavailable(error: sqlite3.Error) -> StoreUnavailable | None:
    """The StoreUnavailable a failed write means, when it is about the disk or contention, not a bug."""
    code = getattr(error, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    reasons = {
        sqlite3.SQLITE_FULL: "the disk is full",
        sqlite3.SQLITE_IOERR: "disk I/O error",
        sqlite3.SQLITE_CANTOPEN: "the database file cannot be opened",
        sqlite3.SQLITE_BUSY: "the database is busy",
        sqlite3.SQLITE_LOCKED: "the database is busy",
    }
    if primary in reasons:
        return StoreUnavailable(f"{reasons[primary]} ({getattr(error, 'sqlite_errorname', primary)})")
    if "disk is full" in str(error) or "disk I/O" in str(error):
        return StoreUnavailable(str(error))
    return None


class _Pool:
    """At most `size` open connections, each lent to one thread for one operation, then returned."""

    def __init__(self, path: Path, size: int) -> None:
        self._path = path
        self._size = size
        self._idle: list[sqlite3.Connection] = []
        self._open = 0
        self._changed = threading.Condition()
        self._closed = False

    @property
    def open_connections(self) -> int:
        return self._open

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        connection = self._take()
        try:
            yield connection
        finally:
            self._give_back(connection)

    def _take(self) -> sqlite3.Connection:
        deadline = time.monotonic() + WAIT_SECONDS
        with self._changed:
            while not self._closed and not self._idle and self._open >= self._size:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreUnavailable(f"the database is busy: no connection free for {WAIT_SECONDS:g} s")
                self._changed.wait(left)
            if self._closed:
                raise StoreUnavailable("the store is closed")
            if self._idle:
                return self._idle.pop()
            self._open += 1
        try:
            return self._connect()
        except BaseException:
            with self._changed:
                self._open -= 1
                self._changed.notify()
            raise

    def _connect(self) -> sqlite3.Connection:
        try:
            connection = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
            # FULL: a request we answered 200 to survives a power cut, not only a crash.
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("PRAGMA busy_timeout=10000")
        except sqlite3.Error as error:
            raise (_unavailable(error) or error) from error
        return connection

    def _give_back(self, connection: sqlite3.Connection) -> None:
        # Never lend a connection half-way through a transaction: one whose rollback failed is dropped.
        if connection.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
        with self._changed:
            if connection.in_transaction or self._closed:
                connection.close()
                self._open -= 1
            else:
                self._idle.append(connection)
            self._changed.notify()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            for connection in self._idle:
                connection.close()
            self._open -= len(self._idle)
            self._idle.clear()
            self._changed.notify_all()


class SQLiteJobStore(SqlJobStore):
    """The JobStore (kontextd/jobs/store.py) of one process; what both SQL stores share is SqlJobStore's."""

    _sql = _SQL
    # One process owns the file (see the lock): whatever runs or is in flight at start-up was the dead
    # previous process's, and this process wakes its own waiters (listen() has nothing to add).
    shared = False
    quick_reads = True  # see JobStore.quick_reads

    def __init__(self, path: Path, pool_size: int = POOL_SIZE, poll_cache: float | None = None) -> None:
        """`poll_cache`: the most seconds poll() answers a request from memory (kontextd/jobs/poll_cache.py;
        None: its default, 0: never)."""
        self._path = path
        self._poll_cache = PollCache(max_age=poll_cache)
        self._poll_cache.set_coherent(True)  # every write is this process's own, through _write()
        path.parent.mkdir(parents=True, exist_ok=True)
        # The embedded store assumes it is the only process using this file: hold a lock for our lifetime.
        self._lock_file = open(path.with_suffix(".lock"), "w")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise DataDirInUse(f"{path} is in use by another kontextd process") from None
        self._pool = _Pool(path, pool_size)
        # One writer at a time, in this process: waiting here is fair and cheap, where waiting on SQLite's
        # lock is polling, and it leaves the other connections to readers.
        self._write_turn = threading.Lock()
        try:
            with self._pool.connection() as connection:
                try:
                    connection.executescript(SCHEMA)
                except sqlite3.Error as error:
                    raise (_unavailable(error) or error) from error
            with self._write() as transaction:
                _migrate(transaction.connection)
        except BaseException:
            self.close()
            raise

    # -- plumbing --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A connection for reads outside any transaction (each statement sees the latest commit)."""
        with self._pool.connection() as connection:
            yield connection

    @contextlib.contextmanager
    def _write(self) -> Iterator[Transaction]:
        """One write transaction: all of it commits or none of it does. A full disk, an I/O error or a
        database busy for too long raise StoreUnavailable (chained) with nothing changed."""
        if not self._write_turn.acquire(timeout=WAIT_SECONDS):
            raise StoreUnavailable(f"the database is busy: no write turn for {WAIT_SECONDS:g} s")
        try:
            with self._pool.connection() as connection:
                try:
                    connection.execute("BEGIN IMMEDIATE")
                    transaction = Transaction(connection)
                    yield transaction
                    connection.execute("COMMIT")
                    if changed := transaction.changed_jobs:  # a poll under way, or kept, may predate them
                        self._poll_cache.changed(changed)
                except BaseException as error:
                    if connection.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL)
                        with contextlib.suppress(sqlite3.Error):
                            connection.execute("ROLLBACK")
                    unavailable = _unavailable(error) if isinstance(error, sqlite3.Error) else None
                    if unavailable is not None:
                        raise unavailable from error
                    raise
        finally:
            self._write_turn.release()

    def _write_one(self) -> contextlib.AbstractContextManager[Transaction]:
        return self._write()  # one writer anyway: a transaction costs nothing extra here

    def open_connections(self) -> int:
        """Database connections open now (at most the pool size)."""
        return self._pool.open_connections

    def close(self) -> None:
        self._pool.close()
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

    def _enqueue(self, transaction: Transaction, request_id: str, lane: str, priority: int) -> int:
        ticket = transaction.execute(
            "INSERT INTO queue_tickets (lane, priority, next_ticket) VALUES (?, ?, 1) "
            "ON CONFLICT (lane, priority) DO UPDATE SET next_ticket = next_ticket + 1"
            " RETURNING next_ticket - 1",
            (lane, priority),
        ).fetchone()[0]
        ticket = ticket if ticket else 0
        transaction.execute(
            "UPDATE jobs SET state = 'IN_QUEUE', lane = ?, priority = ?, ticket = ? WHERE request_id = ?",
            (lane, priority, ticket, request_id),
        )
        transaction.changed(request_id)
        transaction.queued_in(lane)
        return ticket

    # -- jobs ------------------------------------------------------------------------------------

    def submit(self, job: NewJob) -> int:
        with self._write() as transaction:
            transaction.execute(_SUBMIT, statements.new_job_params(job, time.time()))
            ticket = self._enqueue(transaction, job.request_id, job.lane, int(job.priority))
            return self._position(transaction.connection, job.lane, int(job.priority), ticket)

    def queue_position(self, request_id: str) -> int | None:
        with self._read() as connection:
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

    async def poll(self, request_id: str, owner: str | None, with_logs: bool) -> Polled | None:
        """A request polled again before anything changed is answered from memory: every change is this
        process's own, and each commit drops what was kept (kontextd/jobs/poll_cache.py)."""

        async def read() -> tuple[str, Polled] | None:
            return self._read_poll(request_id, with_logs)

        return await self._poll_cache.poll(request_id, owner, with_logs, read)

    def _read_poll(self, request_id: str, with_logs: bool) -> tuple[str, Polled] | None:
        # Right on the event loop: a few index seeks of microseconds (quick_reads) cost less than a thread.
        with self._read() as connection:
            connection.execute("BEGIN")  # one snapshot for the summary, the position and the logs
            try:
                row = connection.execute(_SQL.summary, (request_id,)).fetchone()
                if row is None:
                    return None
                position = None
                if row["state"] == State.IN_QUEUE:
                    position = self._position(connection, row["lane"], row["priority"], row["ticket"])
                logs = None
                if with_logs:
                    logs = [rows.log_line(line) for line in connection.execute(_SQL.logs, (request_id,))]
            finally:
                connection.execute("COMMIT")
        return row["owner"], Polled(rows.summary(row), position, logs)

    async def ping(self) -> None:
        try:
            with self._read() as connection:  # an index seek in the jobs table: the file is there and reads
                connection.execute("SELECT count(*) FROM jobs WHERE request_id = ''").fetchone()
        except sqlite3.Error as error:
            unavailable = _unavailable(error) or StoreUnavailable(f"the database cannot be read: {error}")
            raise unavailable from error

    def serving(self) -> contextlib.AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()  # poll() needs nothing made on the loop

    # -- housekeeping ----------------------------------------------------------------------------

    def _prune_holes(self, transaction: Transaction) -> None:
        found = transaction.execute("SELECT lane, priority FROM queue_tickets").fetchall()
        for lane, priority in found:
            head = self._head(transaction.connection, lane, priority)
            if head is None:
                transaction.execute(
                    "DELETE FROM queue_holes WHERE lane = ? AND priority = ?", (lane, priority)
                )
            else:
                transaction.execute(
                    "DELETE FROM queue_holes WHERE lane = ? AND priority = ? AND ticket < ?",
                    (lane, priority, head),
                )

    def recover_after_restart(self, now: float) -> int:
        """Re-queue every running job, ahead of everything else: each belonged to a dead process, since this
        store is single-process (see the lock). The crash is not the request's fault: it counts as an
        interruption, not a failure; only a request interrupted MAX_INTERRUPTIONS times is ended (it may be
        what kills the server). Returns how many were running."""
        with self._write() as transaction:
            found = transaction.execute(
                f"SELECT {statements.CONTROL_COLUMNS} FROM jobs WHERE state = 'IN_PROGRESS'"
                " ORDER BY started_at, rowid"
            ).fetchall()
            for row in found:
                self._requeue_or_end(transaction, row, now, lifecycle.INTERRUPTED)
            return len(found)

    # -- coordination: one process, nothing to coordinate -----------------------------------------

    def listen(self, on_job: Callable[[str], None], on_lane: Callable[[str], None]) -> Callable[[], None]:
        """Calls neither: the one process using this store wakes its own waiters."""
        return lambda: None

    def turn(self, task: str) -> contextlib.AbstractContextManager[bool]:
        """Always this process's turn: nobody else uses the store."""
        return contextlib.nullcontext(True)


def _migrate(connection: sqlite3.Connection) -> None:
    """Add the columns MIGRATIONS lists that the tables lack: a no-op on a database already migrated."""
    for table, column, definition in MIGRATIONS:
        present = {row["name"] for row in connection.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            connection.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
