"""The scale-out job store: one PostgreSQL database shared by any number of API nodes and worker processes.

It keeps SQLite's semantics exactly (tests/test_job_store.py runs one contract suite over both), with
what sharing needs on top:

- Claims lock the next job with `FOR UPDATE SKIP LOCKED`: claimers in many processes never take the same
  job and never wait for each other; a row locked by anyone else is about to leave the queue anyway. Every
  sweep over many rows (lapsed leases, start deadlines, lane moves, tombstones) skips locked rows too, so
  several nodes may run it at once: the one holding a row handles it.
- Queue positions use SQLite's arithmetic (dense tickets per lane and priority, minus the "holes" left by
  jobs that left out of order). A ticket comes from `INSERT ... ON CONFLICT DO UPDATE ... RETURNING` on a
  per-(lane, priority) counter row, whose row lock is held to the commit: tickets of a level are handed out
  in commit order, so every snapshot sees them dense. A position is one statement (one snapshot, whatever
  the isolation level) of index seeks; `queue_position` reads the job and its position in one
  REPEATABLE READ, READ ONLY transaction.
- Every change to a job is announced with `pg_notify('kontextd_job', request_id)` and every enqueue with
  `pg_notify('kontextd_lane', lane)`, in the changing transaction (PostgreSQL delivers them at its commit,
  and never for a rollback). `listen()` relays them to the process's waiters from a thread of its own.
- While it listens, a request polled again before any change is answered from memory, the cache kept
  coherent by those announcements and by this process's own commits (kontextd/jobs/poll_cache.py):
  clients poll far more often than requests change.
- Nothing assumes a running job or an in-flight webhook belongs to a dead process (`shared = True`): lapsed
  leases and lapsed send deadlines decide, never a start-up.
- The database is never waited on unboundedly: connecting, waiting for a pooled connection, statements and
  lock waits all have limits, and any failure of the database (down, restarting, unreachable, timed out)
  raises StoreUnavailable with a short reason and the cause chained. The pool replaces broken connections
  by itself, so calls work again once PostgreSQL is back. Commits are durable (synchronous_commit on).

Times are the unix floats callers pass (`now`), never the database's clock, as in SQLite: nodes and the
database need not agree on the time beyond what leases tolerate. Bodies are JSON text (cheaper to
round-trip than jsonb; nothing queries inside them); webhook bodies are bytea.
"""

import asyncio
import contextlib
import hashlib
import logging
import math
import select
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolClosed, PoolTimeout

from kontextd.jobs import rows, statements
from kontextd.jobs.model import (
    Job,
    NewJob,
    Outcome,
    Polled,
)
from kontextd.jobs.poll_cache import PollCache
from kontextd.jobs.sql_store import SqlJobStore, Transaction
from kontextd.jobs.store import StoreUnavailable

logger = logging.getLogger(__name__)

# The schema, as the steps that build it, applied in order; the database records how many it has had
# (kontextd_schema_version). Append only: a released step never changes, a change is a new step.
MIGRATIONS: list[str] = [
    # 1: the first release's tables.
    """
    CREATE TABLE kontextd_jobs (
        request_id text PRIMARY KEY,
        seq bigint GENERATED ALWAYS AS IDENTITY,  -- the order jobs were made in (SQLite's rowid)
        gateway_request_id text NOT NULL,
        app_id text NOT NULL,
        owner text NOT NULL,
        lane text NOT NULL,  -- the backend whose workers run it
        input_json text NOT NULL,
        state text NOT NULL,
        priority integer NOT NULL,
        ticket bigint NOT NULL,
        created_at double precision NOT NULL,
        started_at double precision,
        completed_at double precision,
        start_deadline double precision,
        cancel_requested boolean NOT NULL DEFAULT false,
        no_retry boolean NOT NULL DEFAULT false,
        worker_id text,
        lease_expires_at double precision,
        attempts integer NOT NULL DEFAULT 0,
        failures integer NOT NULL DEFAULT 0,  -- its worker was lost (lease lapsed): its own doing
        interruptions integer NOT NULL DEFAULT 0,  -- the server died under it: not its fault, but capped
        storage_failures integer NOT NULL DEFAULT 0,  -- its images could not be stored (disk full)
        webhook_url text,
        output_ttl double precision,
        outcome_json text,  -- how it ended, small: read by every status poll
        result_json text,  -- the result body, possibly megabytes of data URIs: read only by the result route
        expires_at double precision,
        output_expired boolean NOT NULL DEFAULT false
    );
    CREATE INDEX kontextd_jobs_queue ON kontextd_jobs (lane, priority, ticket) WHERE state = 'IN_QUEUE';
    CREATE INDEX kontextd_jobs_deadline ON kontextd_jobs (start_deadline)
        WHERE state = 'IN_QUEUE' AND start_deadline IS NOT NULL;
    CREATE INDEX kontextd_jobs_running ON kontextd_jobs (lease_expires_at) WHERE state = 'IN_PROGRESS';
    CREATE INDEX kontextd_jobs_expiry ON kontextd_jobs (expires_at)
        WHERE NOT output_expired AND expires_at IS NOT NULL;
    CREATE INDEX kontextd_jobs_tombstones ON kontextd_jobs (expires_at) WHERE output_expired;
    CREATE TABLE kontextd_queue_tickets (
        lane text NOT NULL, priority integer NOT NULL, next_ticket bigint NOT NULL,
        PRIMARY KEY (lane, priority)
    );
    CREATE TABLE kontextd_queue_holes (
        lane text NOT NULL, priority integer NOT NULL, ticket bigint NOT NULL,
        PRIMARY KEY (lane, priority, ticket)
    );
    CREATE TABLE kontextd_job_logs (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        request_id text NOT NULL, timestamp double precision NOT NULL, level text NOT NULL,
        message text NOT NULL
    );
    CREATE INDEX kontextd_job_logs_request ON kontextd_job_logs (request_id, seq);
    -- state: pending (next try at next_attempt_at), sending (a try in flight; next_attempt_at is its
    -- deadline, after which the sender is presumed dead and the delivery is due again), delivered, failed.
    CREATE TABLE kontextd_webhook_deliveries (
        delivery_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        request_id text NOT NULL, url text NOT NULL, user_id text NOT NULL, body bytea NOT NULL,
        attempts integer NOT NULL DEFAULT 0, next_attempt_at double precision,
        state text NOT NULL DEFAULT 'pending', last_error text
    );
    CREATE INDEX kontextd_webhook_due ON kontextd_webhook_deliveries (next_attempt_at, delivery_id)
        WHERE state IN ('pending', 'sending');
    CREATE INDEX kontextd_webhook_deliveries_request ON kontextd_webhook_deliveries (request_id);
    -- Deployment-wide secrets (the webhook signing key), made by the first node that asks.
    CREATE TABLE kontextd_secrets (name text PRIMARY KEY, value bytea NOT NULL);
    """,
    # 2: what a run kept for a re-run to resume (JobStore.checkpoint), a JSON object; NULL once it ended.
    "ALTER TABLE kontextd_jobs ADD COLUMN checkpoints_json text;",
    # 3: files uploaded through fal's storage API: whose each is, and until when (JobStore.add_upload).
    """
    CREATE TABLE kontextd_uploads (
        file_key text PRIMARY KEY, owner text NOT NULL, expires_at double precision NOT NULL
    );
    CREATE INDEX kontextd_uploads_expiry ON kontextd_uploads (expires_at);
    """,
    # 4: what a worker that ran such a job before is preferred for (JobStore.claim's `prefer`).
    "ALTER TABLE kontextd_jobs ADD COLUMN affinity text;",
    # 5: what each key's completed requests used, per endpoint and day (JobStore.add_usage).
    """
    CREATE TABLE kontextd_usage (
        owner text NOT NULL, app_id text NOT NULL, day text NOT NULL, requests bigint NOT NULL,
        images bigint NOT NULL, megapixels double precision NOT NULL, gpu_seconds double precision NOT NULL,
        PRIMARY KEY (owner, app_id, day)
    );
    CREATE INDEX kontextd_usage_day ON kontextd_usage (day);
    """,
    # 6: the running job's latest preview, a small JPEG data URI (JobStore.set_preview); NULL otherwise.
    "ALTER TABLE kontextd_jobs ADD COLUMN preview text;",
]
SCHEMA_VERSION = len(MIGRATIONS)  # what this node knows

POOL_SIZE = 8  # pooled connections per store at most (the listener has its own)
CONNECT_TIMEOUT_SECONDS = 5  # to open one connection (libpq counts whole seconds)
WAIT_SECONDS = 10.0  # for a pooled connection (when PostgreSQL is down: then StoreUnavailable)
RECONNECT_SECONDS = 5.0  # the pool retries a lost connection with backoff for this long, then anew on demand
STATEMENT_TIMEOUT_SECONDS = 30.0
LOCK_TIMEOUT_SECONDS = 10.0  # waiting for a row another node holds (SKIP LOCKED paths never wait)
IDLE_IN_TRANSACTION_SECONDS = 60.0  # a node frozen mid-transaction loses its locks (and session) after this
LISTEN_POLL_SECONDS = 0.2  # how often the listener looks up from its connection: how fast it stops
LISTEN_RETRY_SECONDS = (0.2, 2.0)  # the listener's reconnection backoff: first and longest wait

JOB_CHANNEL = "kontextd_job"  # payload: the request id of a job that changed
LANE_CHANNEL = "kontextd_lane"  # payload: a lane work was queued in

_SQL = statements.Statements(statements.POSTGRES)  # what this store runs as the SQLite one does


def _position_sql(lane: str, priority: str, ticket: str) -> str:
    """How many queued jobs of `lane` run before the one with `ticket` at `priority` (SQL expressions:
    parameters or a job's columns), as SQLite counts it: for its own level, the distance from the head of
    the level minus the holes between; for each level ahead of it, the same up to that level's next ticket
    (its length). Index seeks only, a few per level: the queue is never scanned."""
    return f"""(
        SELECT coalesce(sum(
            CASE WHEN head.ticket IS NULL OR head.ticket >= level.upto THEN 0
            ELSE (level.upto - head.ticket) - (
                SELECT count(*) FROM kontextd_queue_holes AS hole
                WHERE hole.lane = {lane} AND hole.priority = level.priority
                    AND hole.ticket > head.ticket AND hole.ticket < level.upto
            ) END
        ), 0)
        FROM (
            SELECT counter.priority,
                CASE WHEN counter.priority = {priority} THEN {ticket} ELSE counter.next_ticket END AS upto
            FROM kontextd_queue_tickets AS counter
            WHERE counter.lane = {lane} AND counter.priority <= {priority}
        ) AS level
        CROSS JOIN LATERAL (
            SELECT min(queued.ticket) AS ticket FROM kontextd_jobs AS queued
            WHERE queued.state = 'IN_QUEUE' AND queued.lane = {lane} AND queued.priority = level.priority
        ) AS head
    )"""


# One statement each: one snapshot of the tickets, holes and heads, whatever the isolation level.
_POSITION = f"SELECT {_position_sql('%(lane)s', '%(priority)s', '%(ticket)s')} AS ahead"
_QUEUE_POSITION = (
    "SELECT CASE WHEN job.state = 'IN_QUEUE' THEN"
    f" {_position_sql('job.lane', 'job.priority', 'job.ticket')} END AS ahead"
    " FROM kontextd_jobs AS job WHERE job.request_id = %(request_id)s"
)

# A status poll (JobStore.poll) in one statement, so one round trip and one snapshot: the summary, the
# position when queued, and the log lines in order when asked for (as one JSON array).
_POLL = (
    "SELECT job.request_id, job.app_id, job.owner, job.state, job.outcome_json, job.output_expired,"
    f" CASE WHEN job.state = 'IN_QUEUE' THEN {_position_sql('job.lane', 'job.priority', 'job.ticket')}"
    " END AS ahead,"
    " CASE WHEN %(with_logs)s THEN (SELECT coalesce(json_agg(json_build_object('message', line.message,"
    " 'level', line.level, 'timestamp', line.timestamp) ORDER BY line.seq), '[]'::json)"
    " FROM kontextd_job_logs AS line WHERE line.request_id = job.request_id) END AS logs"
    " FROM kontextd_jobs AS job WHERE job.request_id = %(request_id)s"
)


# A worker's claim in one statement, so one round trip (in autocommit, its own transaction), for what a
# claim nearly always is: lock the head of the lane that nobody else holds (a concurrent claimer skips past
# it instead of waiting for our commit), start it, leave its hole behind and announce it. When the head's
# start deadline passed, only `head_id` comes back and nothing changed: claim() then takes the general way.
_CLAIM_HEAD = f"""
    WITH head AS (
        SELECT request_id, start_deadline FROM kontextd_jobs WHERE state = 'IN_QUEUE' AND lane = %(lane)s
        ORDER BY priority, ticket LIMIT 1 FOR UPDATE SKIP LOCKED
    ), started AS (
        UPDATE kontextd_jobs AS job SET state = 'IN_PROGRESS', worker_id = %(worker_id)s,
            lease_expires_at = %(lease_expires_at)s, started_at = %(now)s, attempts = job.attempts + 1,
            preview = NULL
        FROM head WHERE job.request_id = head.request_id
            AND (head.start_deadline IS NULL OR head.start_deadline >= %(now)s)
        RETURNING job.*
    ), hole AS (
        INSERT INTO kontextd_queue_holes (lane, priority, ticket)
        SELECT lane, priority, ticket FROM started ON CONFLICT DO NOTHING
    )
    SELECT started.*, head.request_id AS head_id, CASE WHEN started.request_id IS NOT NULL
        THEN pg_notify('{JOB_CHANNEL}', started.request_id) END AS announced
    FROM head LEFT JOIN started ON true
"""
# A worker ending the job it holds, in one statement (one round trip) when the job has no webhook to queue
# with its end: finishing only if it is still this worker's running job, announced with the change.
_FINISH_HELD = (
    f"{_SQL.finish} AND state = 'IN_PROGRESS' AND worker_id = %s AND webhook_url IS NULL"
    f" RETURNING pg_notify('{JOB_CHANNEL}', request_id)"
)


def _polled(row: Mapping[str, Any]) -> Polled:
    logs = None if row["logs"] is None else [rows.log_line(line) for line in row["logs"]]
    return Polled(rows.summary(row), None if row["ahead"] is None else int(row["ahead"]), logs)


def _pool_options() -> dict[str, Any]:
    """What both pools (the threads' and the status polls' async one) share, read when a pool is made."""
    return {
        "kwargs": {"autocommit": True, "row_factory": dict_row},
        "open": False,  # opened by the store, which turns a failure into StoreUnavailable
        "timeout": WAIT_SECONDS,
        # The pool retries a lost connection with exponential backoff; a short give-up keeps the wait
        # between PostgreSQL coming back and the pool noticing short (a fresh try starts on demand).
        "reconnect_timeout": RECONNECT_SECONDS,
    }


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer kontextd than this node: this node must not touch it."""


def _check_connection(connection: psycopg.Connection[Any]) -> None:
    """The pool's check of a connection it lends, without a round trip in the usual case: an idle
    connection has nothing to read unless the server spoke, and a server that ends a session (a restart, a
    terminated backend) says so or closes the socket, both of which make it readable. Only then is it
    checked for real (an empty query), and the pool replaces it if that fails."""
    if _server_spoke(connection):
        ConnectionPool.check_connection(connection)


async def _check_async_connection(connection: psycopg.AsyncConnection[Any]) -> None:
    """_check_connection, for the async pool status polls use."""
    if _server_spoke(connection):
        await AsyncConnectionPool.check_connection(connection)


def _server_spoke(connection: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    readable, _, _ = select.select([connection.fileno()], [], [], 0)
    return bool(readable)


def _lock_key(name: str) -> int:
    """A stable signed 64-bit key for a PostgreSQL advisory lock (Python's hash() differs per process)."""
    return int.from_bytes(hashlib.blake2b(f"kontextd:{name}".encode(), digest_size=8).digest(), signed=True)


_MIGRATION_LOCK = _lock_key("schema-migration")


def _conninfo(dsn: str) -> str:
    """The DSN with our connection defaults added: its own settings win, and its `options` are kept (ours
    go first, so a setting in the DSN's options overrides ours)."""
    params: dict[str, Any] = conninfo_to_dict(dsn)
    defaults = {
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "application_name": "kontextd",
        # A connection to a server that vanished (no RST: a partition, a dead host) is found out in about
        # 25 s instead of hanging until the OS gives up.
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
    }
    for key, value in defaults.items():
        params.setdefault(key, value)
    settings = {
        "statement_timeout": int(STATEMENT_TIMEOUT_SECONDS * 1000),
        "lock_timeout": int(LOCK_TIMEOUT_SECONDS * 1000),
        "idle_in_transaction_session_timeout": int(IDLE_IN_TRANSACTION_SECONDS * 1000),
        "synchronous_commit": "on",  # a request answered 200 survives the database crashing
    }
    ours = " ".join(f"-c {name}={value}" for name, value in settings.items())
    params["options"] = f"{ours} {params.get('options', '')}".strip()
    return make_conninfo("", **params)


class _Transaction(Transaction):
    """A write transaction whose changes are announced with its commit: each job and lane once, in one
    statement just before COMMIT (PostgreSQL delivers them only on commit, and only if it commits)."""

    def send_notifications(self) -> None:
        notes = [(JOB_CHANNEL, job) for job in self.changed_jobs]
        notes += [(LANE_CHANNEL, lane) for lane in self.queued_lanes]
        if notes:
            channels, payloads = zip(*notes, strict=True)
            self.execute(
                "SELECT count(pg_notify(note.channel, note.payload))"
                " FROM unnest(%s::text[], %s::text[]) AS note(channel, payload)",
                (list(channels), list(payloads)),
            )
        self._jobs.clear()  # sent: a later commit on this connection (bench/scratch_postgres.py) sends anew
        self._lanes.clear()


class PostgresJobStore(SqlJobStore):
    """The JobStore (kontextd/jobs/store.py) shared by every node; what both SQL stores share is
    SqlJobStore's."""

    _sql = _SQL
    shared = True
    quick_reads = False  # see JobStore.quick_reads

    def __init__(self, dsn: str, pool_size: int = POOL_SIZE, poll_cache: float | None = None) -> None:
        """`poll_cache`: the most seconds poll() answers a request from memory (kontextd/jobs/poll_cache.py;
        None: its default, 0: never)."""
        self._conninfo = _conninfo(dsn)
        self._password = str(conninfo_to_dict(dsn).get("password") or "")
        self._unreachable_at = -math.inf  # monotonic time the database was last found out of reach
        self._listeners: list[Callable[[], None]] = []
        self._listeners_lock = threading.Lock()
        self._polls: AsyncConnectionPool[psycopg.AsyncConnection[dict[str, Any]]] | None = None  # serving()
        self._poll_cache = PollCache(max_age=poll_cache)  # kept while listen() listens
        # The schema first, on a connection of its own: a node that cannot reach the database or must not
        # use it fails here, at start-up, with the real reason.
        try:
            with psycopg.connect(self._conninfo) as connection:
                _migrate(connection)
        except psycopg.OperationalError as error:
            raise self._unavailable(error) from error
        # Reads run outside transactions (autocommit: one round trip, each statement sees the latest
        # commit); writes open one explicitly. Every connection is checked as it is lent, so that one the
        # database dropped (a restart) is replaced before a call fails on it.
        self._pool_size = pool_size
        self._pool: ConnectionPool[psycopg.Connection[dict[str, Any]]] = ConnectionPool(
            self._conninfo,
            min_size=1,
            max_size=pool_size,
            check=_check_connection,
            name="kontextd-jobs",
            **_pool_options(),
        )
        try:
            self._pool.open(wait=True, timeout=WAIT_SECONDS)
        except psycopg.OperationalError as error:
            self._pool.close()
            raise self._unavailable(error) from error

    # -- plumbing --------------------------------------------------------------------------------

    def _unavailable(self, error: psycopg.Error) -> StoreUnavailable:
        """A short reason for a failure of the database: its first line, never the DSN's password. Also
        notes when the database was last out of reach (see recover_abandoned)."""
        self._unreachable_at = time.monotonic()
        if isinstance(error, PoolTimeout):
            reason = f"no database connection within {WAIT_SECONDS:g} s (is PostgreSQL down?)"
        elif isinstance(error, PoolClosed):
            reason = "the store is closed"
        else:
            lines = str(error).strip().splitlines()
            reason = f"the database is unavailable: {lines[0] if lines else type(error).__name__}"
        if self._password:
            reason = reason.replace(self._password, "***")
        return StoreUnavailable(reason[:300])

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        """A pooled connection, in autocommit, for one call. A failure of the database, while waiting for
        the connection or using it, raises StoreUnavailable; the pool drops a connection that broke."""
        try:
            with self._pool.connection() as connection:
                yield connection
        except (psycopg.OperationalError, psycopg.errors.ReadOnlySqlTransaction) as error:
            # ReadOnlySqlTransaction: we reached a standby (a failover in progress).
            raise self._unavailable(error) from error

    def _read(self) -> contextlib.AbstractContextManager[psycopg.Connection[dict[str, Any]]]:
        """A connection for reads outside any transaction: each statement sees the latest commit."""
        return self._connection()

    def _write_one(self) -> contextlib.AbstractContextManager[psycopg.Connection[dict[str, Any]]]:
        """Autocommit: each statement its own transaction, one round trip."""
        return self._connection()

    @contextlib.contextmanager
    def _write(self) -> Iterator[_Transaction]:
        """One write transaction (READ COMMITTED): all of it commits, with its notifications, or none."""
        with self._connection() as connection, connection.transaction():
            transaction = _Transaction(connection)
            yield transaction
            changed = transaction.changed_jobs
            transaction.send_notifications()
        if changed:  # a write that changed no job (a sweep finding nothing, an empty claim) drops nothing
            # Committed: this node's polls see the change now, not only once its announcement comes back.
            self._poll_cache.changed(changed)

    def close(self) -> None:
        with self._listeners_lock:
            listeners, self._listeners = self._listeners, []
        for stop in listeners:
            stop()
        self._pool.close(timeout=5.0)

    # -- queue arithmetic ------------------------------------------------------------------------

    @staticmethod
    def _position(transaction: _Transaction, lane: str, priority: int, ticket: int) -> int:
        row = transaction.execute(
            _POSITION, {"lane": lane, "priority": priority, "ticket": ticket}
        ).fetchone()
        assert row is not None
        return int(row["ahead"])

    def _enqueue(self, transaction: Transaction, request_id: str, lane: str, priority: int) -> int:
        """Queue an existing job at the tail of (lane, priority) with the level's next ticket."""
        row = transaction.execute(
            "WITH allocated AS ("
            " INSERT INTO kontextd_queue_tickets AS counter (lane, priority, next_ticket) VALUES (%s, %s, 1)"
            " ON CONFLICT (lane, priority) DO UPDATE SET next_ticket = counter.next_ticket + 1"
            " RETURNING counter.next_ticket - 1 AS ticket)"
            " UPDATE kontextd_jobs SET state = 'IN_QUEUE', lane = %s, priority = %s,"
            " ticket = (SELECT ticket FROM allocated) WHERE request_id = %s RETURNING ticket",
            (lane, priority, lane, priority, request_id),
        ).fetchone()
        assert row is not None
        transaction.changed(request_id)
        transaction.queued_in(lane)
        return int(row["ticket"])

    def _prune_holes(self, transaction: Transaction) -> None:
        """Forget the holes behind the head of each level: positions only count holes after the head, and
        a head never moves back (tickets only grow). Rows another node is pruning are skipped, not waited
        for: pruning is only tidying."""
        transaction.execute(
            # A level with nothing queued has its head at its next ticket: all its holes go.
            "WITH head AS (SELECT counter.lane, counter.priority, coalesce((SELECT min(job.ticket)"
            "  FROM kontextd_jobs AS job WHERE job.state = 'IN_QUEUE' AND job.lane = counter.lane"
            "  AND job.priority = counter.priority), counter.next_ticket) AS ticket"
            " FROM kontextd_queue_tickets AS counter)"
            " DELETE FROM kontextd_queue_holes WHERE (lane, priority, ticket) IN ("
            " SELECT hole.lane, hole.priority, hole.ticket FROM kontextd_queue_holes AS hole"
            " JOIN head USING (lane, priority) WHERE hole.ticket < head.ticket"
            " FOR UPDATE OF hole SKIP LOCKED)"
        )

    # -- jobs ------------------------------------------------------------------------------------

    def submit(self, job: NewJob) -> int:
        """Insert the job with its level's next ticket, then read its position in a second statement.
        Not in one: a statement's snapshot is taken when it starts, before the counter row it may have had
        to wait for (a concurrent submit to the same level, committed meanwhile); the second statement's
        snapshot sees every job with an earlier ticket."""
        with self._write() as transaction:
            row = transaction.execute(
                "WITH allocated AS ("
                " INSERT INTO kontextd_queue_tickets AS counter (lane, priority, next_ticket)"
                " VALUES (%(lane)s, %(priority)s, 1)"
                " ON CONFLICT (lane, priority) DO UPDATE SET next_ticket = counter.next_ticket + 1"
                " RETURNING counter.next_ticket - 1 AS ticket)"
                f" INSERT INTO kontextd_jobs ({statements.NEW_JOB_COLUMNS})"
                f" SELECT {_SQL.new_job_values('allocated.ticket')} FROM allocated RETURNING ticket",
                statements.new_job_params(job, time.time()),
            ).fetchone()
            assert row is not None
            transaction.changed(job.request_id)
            transaction.queued_in(job.lane)
            return self._position(transaction, job.lane, int(job.priority), int(row["ticket"]))

    def queue_position(self, request_id: str) -> int | None:
        """The job and its position read in one REPEATABLE READ, READ ONLY snapshot (no locks taken, none
        waited for), sent as one pipeline: a single round trip."""
        with self._connection() as connection:
            with connection.pipeline():
                connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                cursor = connection.execute(_QUEUE_POSITION, {"request_id": request_id})
                connection.execute("COMMIT")
            row = cursor.fetchone()
        return None if row is None or row["ahead"] is None else int(row["ahead"])

    async def poll(self, request_id: str, owner: str | None, with_logs: bool) -> Polled | None:
        """While listen() listens, a request polled again before anything changed is answered from memory
        (kontextd/jobs/poll_cache.py)."""

        async def read() -> tuple[str, Polled] | None:
            row = await self._read_one(_POLL, {"request_id": request_id, "with_logs": with_logs})
            return None if row is None else (row["owner"], _polled(row))

        return await self._poll_cache.poll(request_id, owner, with_logs, read)

    async def ping(self) -> None:
        # The schema version, not just a round trip: a newer node may have migrated the database since
        # this one started (a rolling upgrade), and this node must then stop using it.
        row = await self._read_one("SELECT version FROM kontextd_schema_version", {})
        found = row["version"] if row is not None else 0
        if found != SCHEMA_VERSION:
            raise StoreUnavailable(
                f"the database's kontextd schema is version {found}, this node's is {SCHEMA_VERSION}:"
                " upgrade kontextd on this node"
            )

    async def _read_one(self, statement: str, params: dict[str, Any]) -> dict[str, Any] | None:
        """One row of a read, awaited: on serving()'s async pool, or in a thread outside it (a script, a
        test), through the same statement."""
        pool = self._polls
        if pool is None:
            return await asyncio.to_thread(self._read_one_now, statement, params)
        try:
            async with pool.connection() as connection:
                return await (await connection.execute(statement, params)).fetchone()
        except (psycopg.OperationalError, psycopg.errors.ReadOnlySqlTransaction) as error:
            raise self._unavailable(error) from error  # the pool's timeouts and closing are operational too

    def _read_one_now(self, statement: str, params: dict[str, Any]) -> dict[str, Any] | None:
        with self._read() as connection:
            return connection.execute(statement, params).fetchone()  # type: ignore[arg-type]

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """An async pool for poll(), on this event loop: status polls then need no thread, which on a small
        machine cost more than the read itself (docs/performance.md). It connects on first use, so a
        worker process, which polls nothing, holds no connection for it."""
        pool: AsyncConnectionPool[psycopg.AsyncConnection[dict[str, Any]]] = AsyncConnectionPool(
            self._conninfo,
            min_size=0,
            max_size=self._pool_size,
            check=_check_async_connection,
            name="kontextd-polls",
            **_pool_options(),
        )
        await pool.open()
        self._polls = pool
        try:
            yield
        finally:
            self._polls = None
            await pool.close(timeout=5.0)

    def claim(
        self,
        worker_id: str,
        lease_seconds: float,
        now: float,
        lane: str = "local",
        prefer: Collection[str] = (),
    ) -> Job | None:
        if prefer:  # two reads (the head, then a preferred job behind it): the general way
            return super().claim(worker_id, lease_seconds, now, lane, prefer)
        params = {"lane": lane, "worker_id": worker_id, "lease_expires_at": now + lease_seconds, "now": now}
        with self._connection() as connection:
            head = connection.execute(_CLAIM_HEAD, params).fetchone()
        if head is None:
            return None
        if head["request_id"] is not None:
            self._poll_cache.changed([head["request_id"]])
            return rows.job(head)
        # The head's start deadline passed: the general way, which times such jobs out on the way.
        return super().claim(worker_id, lease_seconds, now, lane)

    def complete(self, request_id: str, outcome: Outcome, now: float, worker_id: str | None = None) -> bool:
        if worker_id is not None:
            with self._connection() as connection:
                finished = connection.execute(
                    _FINISH_HELD, (*statements.finish_params(request_id, outcome, now), worker_id)
                ).rowcount
            if finished:
                self._poll_cache.changed([request_id])
                return True
            # Not finished: it has a webhook to queue with its end, or is no longer this worker's.
        return super().complete(request_id, outcome, now, worker_id)

    # -- housekeeping ----------------------------------------------------------------------------

    def recover_after_restart(self, now: float) -> int:
        """Nothing to do, ever: a running job in a shared store may be a live node's. A dead node's jobs
        are re-queued by recover_abandoned once their leases lapse."""
        return 0

    # -- coordination between the processes sharing the store -----------------------------------

    def listen(self, on_job: Callable[[str], None], on_lane: Callable[[str], None]) -> Callable[[], None]:
        """Relay the store's notifications to `on_job` / `on_lane` from a daemon thread with a connection
        of its own (a LISTEN outlives any one call, so it cannot be a pooled one). A dropped connection is
        reopened with a bounded backoff; what was announced meanwhile is lost (waiters re-read on a
        timeout anyway). Returns once the first LISTEN is in place or the first try failed, so changes
        made after it are seen; the function returned stops the thread within about a second.

        The same relay keeps poll()'s cache coherent with every node's changes (kontextd/jobs/poll_cache.py):
        it is told each change first, and whenever the LISTEN is in place or lost. With no listener,
        poll() reads the database every time."""
        cache = self._poll_cache

        def job_changed(request_id: str) -> None:
            cache.changed((request_id,))
            on_job(request_id)

        def lane_changed(lane: str) -> None:
            cache.changed(())
            on_lane(lane)

        stop, ready = threading.Event(), threading.Event()
        thread = threading.Thread(
            target=self._relay,
            args=(job_changed, lane_changed, cache.set_coherent, stop, ready),
            name="kontextd-store-listen",
            daemon=True,
        )
        thread.start()
        ready.wait(CONNECT_TIMEOUT_SECONDS + 1)

        def stop_listening() -> None:
            stop.set()
            if thread is not threading.current_thread():  # a callback may stop its own listener
                thread.join(LISTEN_POLL_SECONDS + 1)

        with self._listeners_lock:
            self._listeners.append(stop_listening)
        return stop_listening

    def _relay(
        self,
        on_job: Callable[[str], None],
        on_lane: Callable[[str], None],
        on_listening: Callable[[bool], None],
        stop: threading.Event,
        ready: threading.Event,
    ) -> None:
        callbacks = {JOB_CHANNEL: on_job, LANE_CHANNEL: on_lane}
        first_wait, longest_wait = LISTEN_RETRY_SECONDS
        wait = first_wait
        conninfo = make_conninfo(self._conninfo, application_name="kontextd-listen")
        while not stop.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True) as connection:
                    connection.execute(f"LISTEN {JOB_CHANNEL}")
                    connection.execute(f"LISTEN {LANE_CHANNEL}")
                    on_listening(True)
                    ready.set()
                    wait = first_wait
                    try:
                        while not stop.is_set():
                            # Returns after the poll interval at the latest, to look at `stop`.
                            for note in connection.notifies(timeout=LISTEN_POLL_SECONDS):
                                callback = callbacks.get(note.channel)
                                if callback is not None:
                                    try:
                                        callback(note.payload)
                                    except Exception:
                                        logger.exception("a job store listener callback failed")
                                if stop.is_set():
                                    break
                    finally:
                        on_listening(False)  # however it ends: from now on, announcements may be missed
            except psycopg.Error as error:
                if not stop.is_set():
                    logger.warning(
                        "job store listener: %s; reconnecting in %.1f s", self._unavailable(error), wait
                    )
            ready.set()
            if stop.wait(wait):
                break
            wait = min(wait * 2, longest_wait)

    @contextlib.contextmanager
    def turn(self, task: str) -> Iterator[bool]:
        """A session advisory lock on a pooled connection held for the block (autocommit: no transaction
        stays open meanwhile). If the connection dies, PostgreSQL drops the lock with the session; if the
        unlock fails, the connection is closed so that the pool never lends out a session holding it."""
        key = _lock_key(f"turn:{task}")
        with self._connection() as connection:
            row = connection.execute("SELECT pg_try_advisory_lock(%s) AS held", (key,)).fetchone()
            held = bool(row and row["held"])
            try:
                yield held
            finally:
                if held:
                    released = False
                    with contextlib.suppress(psycopg.Error):
                        unlocked = connection.execute(
                            "SELECT pg_advisory_unlock(%s) AS released", (key,)
                        ).fetchone()
                        released = bool(unlocked and unlocked["released"])
                    if not released:
                        connection.close()


def _migrate(connection: psycopg.Connection[Any]) -> None:
    """Bring the schema to SCHEMA_VERSION in one transaction, under an advisory lock so that nodes starting
    together take turns (the second finds the work done). A database migrated by a newer kontextd is left
    alone: this node refuses to start (SchemaTooNew). A step may take long (an index on a big table), so
    the statement timeout is lifted; the lock timeout stays, so that a step never queues every other node's
    queries behind a lock it cannot get (the node fails to start instead, and is started again)."""
    with connection.transaction():
        connection.execute("SET LOCAL statement_timeout = 0")
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        connection.execute(
            "CREATE TABLE IF NOT EXISTS kontextd_schema_version ("
            " singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton), version integer NOT NULL)"
        )
        row = connection.execute("SELECT version FROM kontextd_schema_version").fetchone()
        found = row[0] if row is not None else 0
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the database's kontextd schema is version {found}, newer than this node's version"
                f" {SCHEMA_VERSION}: upgrade kontextd on this node (a newer release migrated the database)"
            )
        for step in MIGRATIONS[found:]:
            connection.execute(step)  # type: ignore[arg-type] - our own constant SQL
        if found < SCHEMA_VERSION:
            connection.execute(
                "INSERT INTO kontextd_schema_version (version) VALUES (%s)"
                " ON CONFLICT (singleton) DO UPDATE SET version = excluded.version",
                (SCHEMA_VERSION,),
            )
            logger.info("job store schema migrated from version %d to %d", found, SCHEMA_VERSION)
