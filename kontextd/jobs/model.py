"""What the job store keeps: jobs, their outcomes, log lines and webhook deliveries."""

import enum
from dataclasses import dataclass, field
from typing import Any


class State(enum.StrEnum):
    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"


class Priority(enum.IntEnum):
    """Lower runs first. A request re-queued after its worker died goes ahead of everything."""

    RETRY = 0
    NORMAL = 1
    LOW = 2


class Release(enum.Enum):
    """Why a worker hands a running request back to the queue (JobStore.release)."""

    SHUTDOWN = "SHUTDOWN"  # the server is stopping: not the request's doing, nothing counted
    STORAGE_FULL = "STORAGE_FULL"  # its images could not be stored: retried once space returns, capped


class CancelResult(enum.Enum):
    NOT_FOUND = "NOT_FOUND"
    ALREADY_COMPLETED = "ALREADY_COMPLETED"
    CANCELLED = "CANCELLED"  # was queued: completed as client_cancelled now
    REQUESTED = "REQUESTED"  # is running: the worker stops it between steps


@dataclass(frozen=True)
class NewJob:
    request_id: str
    gateway_request_id: str
    app_id: str
    owner: str
    input: dict[str, Any]
    lane: str = "local"  # the backend whose workers run it (see kontextd.routing)
    priority: Priority = Priority.NORMAL
    start_deadline: float | None = None  # unix time by which the request must have started
    webhook_url: str | None = None
    output_ttl_seconds: float | None = None
    no_retry: bool = False
    # What a worker that ran such a job before is preferred for: the client's X-Fal-Runner-Hint, or the
    # job's LoRA set (kontextd.catalogue.endpoints.affinity). None: any worker, in queue order.
    affinity: str | None = None


@dataclass(frozen=True)
class Usage:
    """What one key's requests to one endpoint used on one day (UTC): the figures GET /v1/usage reports."""

    owner: str
    app_id: str
    day: str  # YYYY-MM-DD, UTC
    requests: int  # completed with images
    images: int
    megapixels: float
    gpu_seconds: float  # on this deployment's GPUs (local lanes); upstream APIs bill their own


@dataclass(frozen=True)
class Outcome:
    """How a request ended: the HTTP status and body its result URL serves, and what status reports."""

    status_code: int
    body: dict[str, Any]
    error: str | None = None
    error_type: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    output_keys: tuple[str, ...] = ()  # stored files that expire with the request
    served_by: str | None = None  # the model that made the output: the x-kontextd-model header

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Job:
    request_id: str
    gateway_request_id: str
    app_id: str
    owner: str
    lane: str
    input: dict[str, Any]
    state: State
    priority: Priority
    created_at: float
    started_at: float | None
    completed_at: float | None
    cancel_requested: bool
    attempts: int  # times it was started
    webhook_url: str | None
    outcome: Outcome | None
    output_expired: bool
    failures: int = 0  # times its worker was lost while the server ran (lease lapsed): its own doing
    interruptions: int = 0  # times the server process died under it: not its fault, capped all the same
    storage_failures: int = 0  # times its images could not be stored (disk full)
    # What earlier runs of it kept for a re-run to resume (JobStore.checkpoint): upstream tasks' handles.
    checkpoints: dict[str, str] = field(default_factory=dict)
    affinity: str | None = None  # as submitted (NewJob.affinity)


@dataclass(frozen=True)
class JobSummary:
    """What a status poll needs: small, whatever the size of the request's input and result."""

    request_id: str
    app_id: str
    state: State
    metrics: dict[str, float]
    error: str | None
    error_type: str | None
    output_expired: bool


@dataclass(frozen=True)
class LogLine:
    message: str
    level: str
    timestamp: float


@dataclass(frozen=True)
class QueueDepth:
    """One lane's queue as a scrape sees it (JobStore.queue_depths)."""

    depth: int  # jobs queued
    oldest_created_at: float  # when the longest-waiting of them was submitted


@dataclass(frozen=True)
class Polled:
    """What one status poll reads (JobStore.poll)."""

    summary: JobSummary
    queue_position: int | None  # how many queued requests run before it, when it is queued
    logs: list[LogLine] | None  # when asked for


@dataclass(frozen=True)
class WebhookDelivery:
    delivery_id: int
    request_id: str
    url: str
    user_id: str
    body: bytes
    attempts: int  # finished tries; one cut short by a crash or shutdown does not count
    state: str = "pending"  # pending, sending (a try in flight), delivered or failed (given up)
    last_error: str | None = None


@dataclass(frozen=True)
class DueWebhook:
    """A delivery due for a try, without its body (possibly megabytes): what the dispatcher schedules."""

    delivery_id: int
    request_id: str
    url: str
    due_at: float
