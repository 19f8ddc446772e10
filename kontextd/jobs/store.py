"""The job store interface: the durable queue and state every other part talks to.

The embedded implementation is SQLite (`kontextd.jobs.sqlite`); a scale-out one (PostgreSQL with
SKIP LOCKED claims and LISTEN/NOTIFY) implements the same protocol. Methods are synchronous and short;
the API calls the writing ones off the event loop.
"""

from collections.abc import Mapping, Sequence
from typing import Protocol

from kontextd.jobs.model import CancelResult, Job, JobSummary, LogLine, NewJob, Outcome, WebhookDelivery


class StoreUnavailable(Exception):
    """The store cannot take this write now (disk full, database busy for too long); nothing was changed.
    The API answers 503 with Retry-After: the caller should try again later."""


class JobStore(Protocol):
    def submit(self, job: NewJob) -> int:
        """Persist a new queued job; returns its queue position (0 = next to run)."""

    def get(self, request_id: str, owner: str | None = None) -> Job | None:
        """The job, or None when unknown or (with `owner`) made by someone else."""

    def summary(self, request_id: str, owner: str | None = None) -> JobSummary | None:
        """Like get(), without the input and result bodies: what status polls read."""

    def queue_position(self, request_id: str) -> int | None:
        """How many queued jobs run before this one; None when it is not queued. Never scans the queue."""

    def claim(self, worker_id: str, lease_seconds: float, now: float, lane: str = "local") -> Job | None:
        """Take the next job of `lane` to run and mark it IN_PROGRESS under a lease. Jobs whose start
        deadline passed are completed as timed out on the way."""

    def renew_lease(self, request_id: str, worker_id: str, lease_seconds: float, now: float) -> bool:
        """Extend a running job's lease; False when the job is no longer this worker's."""

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

    def recover_abandoned(self, now: float) -> int:
        """Re-queue running jobs whose lease lapsed (their worker died), ahead of everything else."""

    def move_to_lanes(self, lanes: Mapping[str, str]) -> int:
        """Re-queue queued jobs of each app id (key) into its lane (value) when it is in another one,
        keeping priority and order; returns how many moved. Run at start-up, after routing is read."""

    def expired_outputs(self, now: float, limit: int) -> list[tuple[str, Sequence[str]]]:
        """(request_id, stored keys) of finished jobs whose outputs outlived their lifetime."""

    def mark_output_expired(self, request_id: str) -> None: ...

    def due_webhooks(self, now: float, limit: int) -> list[WebhookDelivery]: ...

    def webhook_attempted(
        self, delivery_id: int, delivered: bool, next_attempt_at: float | None, error: str
    ) -> None:
        """Record one delivery attempt; `next_attempt_at` None with delivered False means give up."""

    def close(self) -> None: ...
