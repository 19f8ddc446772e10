"""Everything the HTTP handlers need, built once by the server and handed to create_app()."""

from dataclasses import dataclass, field

from kontextd.api.auth import Authenticator
from kontextd.api.changes import ChangeFeed
from kontextd.backends.base import Backend
from kontextd.config import Settings
from kontextd.fetch.guard import GuardedFetcher
from kontextd.jobs.store import JobStore
from kontextd.storage.local import LocalStorage
from kontextd.webhooks.signing import WebhookSigner
from kontextd.worker.runner import Worker


@dataclass
class Services:
    settings: Settings
    store: JobStore
    storage: LocalStorage
    authenticator: Authenticator
    signer: WebhookSigner
    fetcher: GuardedFetcher
    backend: Backend
    instance_id: str = "kontextd"  # prefixes worker ids so leases name the process that holds them
    workers: list[Worker] = field(default_factory=list)
    feed: ChangeFeed | None = None  # made in the lifespan, once the event loop runs

    def wake_workers(self) -> None:
        for worker in self.workers:
            worker.wake.set()

    def notify(self, request_id: str) -> None:
        if self.feed is not None:
            self.feed.notify(request_id)
