"""The job store interface: the durable queue and state every other part talks to.

The embedded implementation is SQLite (`kontextd.jobs.sqlite`), used by one process; the scale-out one is
PostgreSQL (`kontextd.jobs.postgres`: SKIP LOCKED claims, LISTEN/NOTIFY), shared by any number of API
nodes and worker processes. What they do alike is written once (`kontextd.jobs.sql_store`, with the SQL
of `kontextd.jobs.statements`), and both pass one contract suite (tests/test_job_store.py). Methods are
synchronous and short, and the API calls them off the event loop, but for poll(): the read a status poll
makes, awaited on the loop. Any call may raise StoreUnavailable (a full disk, a database that is down or
restarting).

A running request that stops short is re-run from the start, ahead of everything queued, unless it asked
for no retries (`x-fal-no-retry`) or was cancelled. What stopped it decides what is counted against it:
its worker lost while the server ran (a lapsed lease) is its own failure; the server process dying under
it is an interruption (capped separately and more loosely: a request may be what kills the server); a
graceful shutdown counts nothing; images that could not be stored count as storage failures.
"""

import contextlib
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Protocol

from kontextd.jobs.model import (
    CancelResult,
    DueWebhook,
    Job,
    JobSummary,
    LogLine,
    NewJob,
    Outcome,
    Polled,
    QueueDepth,
    Release,
    State,
    Usage,
    WebhookDelivery,
)


class StoreUnavailable(Exception):
    """The store cannot take this write now (disk full, I/O error, database busy for too long); nothing
    was changed, and the cause is chained. The API answers 503 with Retry-After: try again later."""


class JobStore(Protocol):
    # True when several processes use the store at once (PostgreSQL): then nothing may assume that a
    # running job or an in-flight webhook belongs to a dead process; their leases and deadlines decide.
    shared: bool
    # True when reads are local index seeks of microseconds (SQLite): the API makes them on its event loop,
    # where a thread hop would cost more than the read. False (PostgreSQL): reads go to threads, but for
    # poll(), which is awaitable.
    quick_reads: bool

    def submit(self, job: NewJob) -> int:
        """Persist a new queued job; returns its queue position (0 = next to run)."""

    def get(self, request_id: str, owner: str | None = None) -> Job | None:
        """The job, or None when unknown or (with `owner`) made by someone else."""

    def summary(self, request_id: str, owner: str | None = None) -> JobSummary | None:
        """Like get(), without the input and result bodies: what status polls read."""

    def queue_position(self, request_id: str) -> int | None:
        """How many queued jobs run before this one; None when it is not queued. Never scans the queue.
        Read from the database each time, never from poll()'s cache: the API reads positions through
        poll(); this is the independent read the contract suite checks poll() and its cache against."""

    def queue_depths(self) -> dict[str, QueueDepth]:
        """Each lane with queued jobs: how many, and when the oldest was submitted (what /metrics shows).
        Reads every queued row once: made per scrape, never per request."""

    async def poll(self, request_id: str, owner: str | None, with_logs: bool) -> Polled | None:
        """What a status poll reads, awaited on the event loop: the summary (None when unknown or, with
        `owner`, someone else's), the queue position when it is queued, the log lines when `with_logs`;
        all as of one moment. One call, so a store across a network answers it in one round trip and
        without a thread (PostgreSQL, inside serving(); outside it, in a thread). A request polled
        again before anything changed may be answered from memory (kontextd/jobs/poll_cache.py): this
        process's own writes are seen at once, another process's once its announcement arrives."""

    async def ping(self) -> None:
        """One round trip that shows the store answers now and may be used by this node (what /health
        reports): raises StoreUnavailable when it cannot, saying why, e.g. a database migrated meanwhile
        by a newer kontextd, which this node must not write to."""

    def serving(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Entered on the event loop while the process serves: what poll() needs there (PostgreSQL: an
        async connection pool, made on the loop it runs on and closed before that loop ends)."""

    def claim(
        self,
        worker_id: str,
        lease_seconds: float,
        now: float,
        lane: str = "local",
        prefer: Collection[str] = (),
    ) -> Job | None:
        """Take the next job of `lane` to run and mark it IN_PROGRESS under a lease (counting an attempt).
        Jobs whose start deadline passed are completed as timed out on the way. `prefer`: affinities this
        worker is preferred for (NewJob.affinity); a queued job with one of them, of the head's priority
        and at most lifecycle.AFFINITY_WINDOW tickets behind the head, is taken before the head."""

    def set_preview(self, request_id: str, worker_id: str, preview: str) -> bool:
        """Keep `preview` (a small image data URI) as the running job's latest, announced like any change
        so status streams asking for previews wake; False when the job is no longer this worker's
        running job. Cleared when the job starts and when it ends."""

    def preview(self, request_id: str) -> str | None:
        """The running job's latest preview; None when it has none or is not running. The caller has
        checked that the job is the asker's."""

    def renew_lease(self, request_id: str, worker_id: str, lease_seconds: float, now: float) -> bool:
        """Extend a running job's lease to `now + lease_seconds`; False when the job is no longer this
        worker's. A worker renews well within the lease for as long as the request runs."""

    def release(self, request_id: str, worker_id: str, reason: Release, now: float) -> State | None:
        """Hand a running job of this worker back, re-queued at the head of its lane with a WARN line in its
        logs. SHUTDOWN (the server stops between steps) counts nothing; STORAGE_FULL counts a storage
        failure and ends the job with `storage_error` (503) at the limit. A cancelled job ends cancelled,
        an x-fal-no-retry one ends failed. Returns the job's state after, or None when it was not this
        worker's running job (nothing changed)."""

    def checkpoint(self, request_id: str, worker_id: str, name: str, value: str) -> bool:
        """Keep `value` under `name` with a job this worker is running (an upstream task's handle), so that
        a re-run after a crash, a shutdown or a lapsed lease resumes it (Job.checkpoints) instead of
        starting it again; a later value under the same name replaces it. Kept until the job ends. False
        when the job is no longer this worker's (nothing changed)."""

    def complete(self, request_id: str, outcome: Outcome, now: float, worker_id: str | None = None) -> bool:
        """End a job exactly once (with `worker_id`, only if that worker still holds it). Queues its
        webhook in the same transaction. False when it had already ended or was taken over."""

    def cancel(self, request_id: str, owner: str, now: float) -> CancelResult:
        """Cancel a queued job at once, or flag a running one for its worker."""

    def cancel_requested(self, request_id: str) -> bool: ...

    def append_log(self, request_id: str, message: str, level: str, now: float) -> None: ...

    def logs(self, request_id: str) -> list[LogLine]: ...

    def expire_unstarted(self, now: float) -> int:
        """Complete queued jobs whose start deadline passed; returns how many."""

    def recover_abandoned(self, now: float, settle_seconds: float = 0.0) -> int:
        """Re-queue running jobs whose lease lapsed while the server runs (their worker hung or died),
        ahead of everything else. Counted as the request's own failure: at the limit it ends with
        internal_server_error; cancelled and x-fal-no-retry jobs end instead. Returns how many lapsed.
        A shared store re-queues nothing until it has been reachable for `settle_seconds` (the lease): a
        database outage stops every heartbeat, and the live workers renew once it is back."""

    def recover_after_restart(self, now: float) -> int:
        """Only for a store that is not shared, at start-up: re-queue every running job, ahead of
        everything else, counted as an interruption (each belonged to the dead process before this one).
        A shared store re-queues nothing here (returns 0): lapsed leases are recovered instead."""

    def move_to_lanes(self, lanes: Mapping[str, str]) -> int:
        """Re-queue queued jobs of each app id (key) into its lane (value) when it is in another one,
        keeping priority and order; returns how many moved. Run at start-up, after routing is read."""

    def expired_outputs(self, now: float, limit: int) -> list[tuple[str, Sequence[str]]]:
        """(request_id, stored keys) of finished jobs whose outputs outlived their lifetime."""

    def mark_output_expired(self, request_id: str) -> None:
        """The job's files are gone: keep only a tombstone (its state and how it ended, so status still
        answers and the result says 410); delete its logs and its input and result bodies."""

    def prune_records(self, expired_before: float, limit: int) -> int:
        """Delete up to `limit` tombstones of jobs whose outputs expired before `expired_before`, with their
        logs and finished webhook deliveries (a delivery still to be tried keeps its job); returns how many.
        The job is then unknown."""

    # Uploads: files clients stored through fal's storage API (kontextd.api.uploads), each its owner's input
    # until it expires. The record is made before the file is stored: a crash in between leaves a record
    # whose file is missing (deleting it is no error), never a file no sweep knows of.

    def add_upload(self, key: str, owner: str, expires_at: float) -> None:
        """Record that the upload `key` (kontextd.storage.keys.upload_key) is `owner`'s until `expires_at`;
        recording the same key again keeps the first record (keys are random: only a retry repeats one)."""

    def upload_owner(self, key: str, now: float) -> str | None:
        """The owner of the upload `key` while it is kept (it expires after `now`); None when it is unknown
        or its time is up, whether or not the sweep has deleted it yet."""

    def expired_uploads(self, now: float, limit: int) -> list[str]:
        """Up to `limit` keys of uploads whose time is up at `now` (the complement of upload_owner()), the
        longest expired first: the sweep deletes their files, then forgets them."""

    # Usage: what each key's completed requests used, per endpoint and day (kontextd.api.usage). Kept apart
    # from the jobs, which are pruned after their retention, so an operator can bill from it.

    def add_usage(self, usage: Usage) -> None:
        """Add one completed request's figures (`usage.requests` is 1) to its key's, endpoint's and day's
        totals. Made by the worker after the request's end is recorded: a crash in between undercounts
        one request, never counts one twice."""

    def usage(self, since: str, until: str, owner: str | None = None) -> list[Usage]:
        """The totals of each (key, endpoint, day) from day `since` to day `until`, both included
        (YYYY-MM-DD), for `owner` only when given, ordered by day, key and endpoint."""

    def forget_uploads(self, keys: Collection[str]) -> None:
        """Delete these uploads' records (their files are gone); unknown keys are no error."""

    # Webhooks: a delivery is pending (next try at its due time), sending (a try in flight until a
    # deadline; past it the sender is presumed dead and it is due again), delivered or failed (given up).

    def due_webhooks(self, now: float, limit: int, after: DueWebhook | None = None) -> list[DueWebhook]:
        """Deliveries due at `now`, pending or in flight past their deadline, oldest first; `after` (the
        last of a previous page) continues a listing."""

    def start_webhook(self, delivery_id: int, now: float, deadline: float) -> WebhookDelivery | None:
        """Mark a due delivery in flight until `deadline`, before it is sent: a crash mid-send leaves it
        due again once the deadline lapses. None when it is no longer due (sent or taken meanwhile)."""

    def webhook_attempted(
        self, delivery_id: int, delivered: bool, next_attempt_at: float | None, error: str
    ) -> None:
        """Record a finished try; `next_attempt_at` None with delivered False means give up."""

    def release_webhooks(self, now: float, delivery_ids: Collection[int] | None = None) -> int:
        """Make in-flight deliveries due at `now` without counting the try cut short: those named (a
        shutdown interrupted them), or every one (None: at start-up, for a store only this process uses).
        Returns how many."""

    def webhook_deliveries(self, request_id: str) -> list[WebhookDelivery]:
        """A request's deliveries and where each stands, oldest first."""

    # Coordination between the processes sharing a store.

    def listen(self, on_job: Callable[[str], None], on_lane: Callable[[str], None]) -> Callable[[], None]:
        """Call `on_job(request_id)` whenever any process changes a job (state, logs, cancel flag) and
        `on_lane(lane)` whenever work is queued in a lane, from a thread of the store's; returns a function
        that stops listening. Wake-ups may be lost (a reconnect) or spurious: waiters re-read the store on
        a timeout too. A store that is not shared calls neither: its one process notifies itself."""

    def secret(self, name: str, make: Callable[[], bytes]) -> bytes:
        """The deployment-wide secret `name` (the webhook signing key), made with `make()` and kept by the
        first process that asks; every later call, in any process, gets those same bytes."""

    def turn(self, task: str) -> contextlib.AbstractContextManager[bool]:
        """A deployment-wide turn at a periodic `task` (sweeping): the block sees True when this process
        holds it (no other process holds it until the block ends) and False when another one does, so a
        chore runs once per period, not once per node. A store that is not shared always gives True."""

    def close(self) -> None: ...
