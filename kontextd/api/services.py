"""Everything the HTTP handlers and the runtime share, built once per process by kontextd.server."""

from dataclasses import dataclass, field

from kontextd.api.auth import Authenticator
from kontextd.api.changes import ChangeFeed
from kontextd.api.upload_signing import UploadSigner
from kontextd.backends import BackendPlan
from kontextd.config import Settings
from kontextd.fetch.guard import GuardedFetcher
from kontextd.jobs.store import JobStore
from kontextd.routing import Routing
from kontextd.safety.config import SafetyConfig
from kontextd.storage.base import Storage
from kontextd.storage.urls import FileUrls
from kontextd.webhooks.signing import WebhookSigner
from kontextd.worker.runner import Worker


@dataclass
class Readiness:
    """What /health reports: loading until the model is ready, or failed with the reason."""

    state: str = "loading"
    backend: str | None = None
    reason: str | None = None

    def ready(self, backend: str | None) -> None:
        self.state, self.backend = "ready", backend

    def fail(self, reason: str) -> None:
        self.state, self.reason = "failed", reason

    def describe(self) -> dict[str, str | None]:
        return {"status": self.state, "backend": self.backend, "reason": self.reason}


@dataclass
class Services:
    settings: Settings
    store: JobStore
    storage: Storage
    urls: FileUrls  # how clients reach stored files, rendered per response
    authenticator: Authenticator
    signer: WebhookSigner
    uploads: UploadSigner  # signs upload tokens and upload URLs (fal's storage API)
    fetcher: GuardedFetcher
    plan: BackendPlan
    routing: Routing
    safety: SafetyConfig = field(default_factory=SafetyConfig)  # the local lane's checker
    readiness: Readiness = field(default_factory=Readiness)  # the local model's
    lanes: dict[str, Readiness] = field(default_factory=dict)  # every backend in use, "local" included
    instance_id: str = "kontextd"  # prefixes worker ids so leases name the process that holds them
    workers: list[Worker] = field(default_factory=list)
    feed: ChangeFeed | None = None  # made by the runtime, once the event loop runs

    def wake_workers(self, lane: str | None = None) -> None:
        """Wake this process's idle workers (of `lane`, or all) to claim at once."""
        for worker in self.workers:
            if lane is None or worker.lane == lane:
                worker.wake.set()

    def close(self) -> None:
        self.store.close()
        self.storage.close()

    def notify(self, request_id: str) -> None:
        if self.feed is not None:
            self.feed.notify(request_id)
