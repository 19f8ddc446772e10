"""Webhook delivery: signed POSTs through the fetch guard, retried with backoff from the durable job store."""

import asyncio
import logging
import time

from kontextd.background import pause
from kontextd.fetch.guard import FetchError, GuardedFetcher
from kontextd.jobs.model import WebhookDelivery
from kontextd.jobs.store import JobStore
from kontextd.webhooks.signing import WebhookSigner

log = logging.getLogger("kontextd.webhooks")

BATCH = 32


class WebhookDispatcher:
    def __init__(
        self, store: JobStore, signer: WebhookSigner, fetcher: GuardedFetcher, backoff: tuple[float, ...]
    ) -> None:
        self._store = store
        self._signer = signer
        self._fetcher = fetcher
        self._backoff = backoff  # gaps between tries: len(backoff) + 1 tries in all

    async def run(self, stop: asyncio.Event, poll_seconds: float = 1.0) -> None:
        while not stop.is_set():
            try:
                due = await asyncio.to_thread(self._store.due_webhooks, time.time(), BATCH)
                await asyncio.gather(*(self._deliver(delivery) for delivery in due))
            except Exception:  # keep delivering: one bad row or a database hiccup must not stop webhooks
                log.exception("webhook round failed")
            await pause(stop, poll_seconds)

    async def _deliver(self, delivery: WebhookDelivery) -> None:
        headers = {"Content-Type": "application/json"} | self._signer.sign_headers(
            delivery.request_id, delivery.user_id, delivery.body
        )
        try:
            code = await self._fetcher.post(delivery.url, delivery.body, headers)
            delivered, error = 200 <= code < 300, f"HTTP {code}"
        except FetchError as failure:
            delivered, error = False, failure.message
        tries = delivery.attempts + 1
        next_attempt = None
        if not delivered and tries <= len(self._backoff):
            next_attempt = time.time() + self._backoff[tries - 1]
        await asyncio.to_thread(
            self._store.webhook_attempted, delivery.delivery_id, delivered, next_attempt, error
        )
        log.info(
            "webhook attempt",
            extra={
                "request_id": delivery.request_id,
                "try": tries,
                "delivered": delivered,
                "error": None if delivered else error,
                "retry_in": None if next_attempt is None else round(next_attempt - time.time(), 1),
            },
        )
