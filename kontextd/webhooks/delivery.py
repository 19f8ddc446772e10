"""Webhook delivery: signed POSTs through the fetch guard, retried with backoff from the durable job store.

Each due delivery is tried by its own task, so a receiver that hangs until the fetch timeout delays only
itself: at most `per_target` tries are in flight to one receiver (scheme, host and port) and `overall` in
all. A try is marked in flight in the store before the POST and its outcome recorded right after, so a
crash mid-send leaves the delivery due again once its deadline lapses (or at the next start), never lost.
The guarantee is at least once: a crash between the receiver's answer and the record repeats the try, with
the same `X-Kontextd-Webhook-Id`, which receivers dedupe on.
"""

import asyncio
import collections
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from kontextd import metrics
from kontextd.fetch.guard import FetchError, FetchLimits, GuardedFetcher
from kontextd.jobs.model import DueWebhook, WebhookDelivery
from kontextd.jobs.store import JobStore, StoreUnavailable
from kontextd.storage.urls import KEY_FIELD
from kontextd.webhooks.signing import WebhookSigner

log = logging.getLogger("kontextd.webhooks")

WEBHOOK_ID_HEADER = "X-Kontextd-Webhook-Id"
PER_TARGET = 4  # tries in flight at once to one receiver
OVERALL = 32  # tries in flight at once in all; the fetcher's connection pool is shared with image fetches
PAGE = 256  # due deliveries read at a time while looking for ones whose receiver has a free slot
# The in-flight deadline: the fetch timeout bounds the POST, this covers recording its outcome too.
DEADLINE_MARGIN_SECONDS = 30.0
# Namespaces the delivery ids: stable for a delivery, and no count of deliveries shows through.
_ID_NAMESPACE = uuid.UUID("6f1b7c1e-3c1a-4f5e-9a59-2f8d4a0b9c11")


def target_of(url: str) -> str:
    """The receiver a URL names, for the per-receiver limit: scheme, host and port."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return url  # the guard refuses it on the try; alone in its own slot meanwhile
    port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme)
    return f"{parsed.scheme}://{parsed.host}:{port}"


def webhook_id(delivery: WebhookDelivery) -> str:
    """The delivery id header's value: the same on every try and across restarts, different per delivery."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{delivery.request_id}/{delivery.delivery_id}"))


class WebhookDispatcher:
    def __init__(
        self,
        store: JobStore,
        signer: WebhookSigner,
        fetcher: GuardedFetcher,
        backoff: tuple[float, ...],
        *,
        send_timeout: float = FetchLimits().timeout_seconds,
        per_target: int = PER_TARGET,
        overall: int = OVERALL,
        deadline_seconds: float | None = None,
        render: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        """`send_timeout` is the fetcher's: how long a POST may take. `deadline_seconds`, how long a try
        stays marked in flight, defaults to that plus a margin. `render` turns the stored payload's file
        keys into URLs, at each try (kontextd.storage.urls: a presigned URL is signed from now)."""
        self._render = render
        self._store = store
        self._signer = signer
        self._fetcher = fetcher
        self._backoff = backoff  # gaps between tries: len(backoff) + 1 tries in all
        if deadline_seconds is None:
            deadline_seconds = send_timeout + DEADLINE_MARGIN_SECONDS
        self._deadline_seconds = deadline_seconds
        self._per_target = per_target
        self._overall = overall
        self._tries: dict[int, asyncio.Task[None]] = {}  # delivery id -> its try in flight
        self._busy: collections.Counter[str] = collections.Counter()  # target -> tries in flight
        self._slot_freed = asyncio.Event()
        self.rounds = 0  # finished looks for due deliveries: lets tests wait for "a round later"

    async def run(self, stop: asyncio.Event, poll_seconds: float = 1.0) -> None:
        try:
            while not stop.is_set():
                self._slot_freed.clear()  # before the round: a slot freed during it starts another
                try:
                    await self._start_due()
                except StoreUnavailable as error:  # the database restarting: said without a traceback
                    log.warning(
                        "webhook round skipped: the store is unavailable", extra={"reason": str(error)}
                    )
                except Exception:  # keep delivering: one bad row or a database hiccup must not stop webhooks
                    log.exception("webhook round failed")
                self.rounds += 1
                await self._wait(stop, poll_seconds)
        finally:
            await self._interrupt()

    async def _wait(self, stop: asyncio.Event, seconds: float) -> None:
        """Until the next poll, a freed slot (a try ended) or shutdown, whichever comes first."""
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._slot_freed.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _start_due(self) -> None:
        after: DueWebhook | None = None
        while len(self._tries) < self._overall:
            page = await asyncio.to_thread(self._store.due_webhooks, time.time(), PAGE, after)
            for due in page:
                if len(self._tries) >= self._overall:
                    return
                self._maybe_start(due)
            if len(page) < PAGE:
                return
            after = page[-1]  # the rest of the due ones: those so far may all wait on busy receivers

    def _maybe_start(self, due: DueWebhook) -> None:
        target = target_of(due.url)
        # In flight here already: its deadline lapsed while the try still runs (a slow store write).
        if due.delivery_id in self._tries or self._busy[target] >= self._per_target:
            return
        self._busy[target] += 1
        task = asyncio.create_task(self._try(due.delivery_id, target))
        self._tries[due.delivery_id] = task
        task.add_done_callback(lambda _: self._ended(due.delivery_id, target))

    def _ended(self, delivery_id: int, target: str) -> None:
        del self._tries[delivery_id]
        self._busy[target] -= 1
        if not self._busy[target]:
            del self._busy[target]
        self._slot_freed.set()

    async def _try(self, delivery_id: int, target: str) -> None:
        try:
            now = time.time()
            delivery = await asyncio.to_thread(
                self._store.start_webhook, delivery_id, now, now + self._deadline_seconds
            )
            if delivery is None:
                return  # ended or taken since it was listed
            delivered, error, final = await self._send(delivery)
            await self._record(delivery, target, delivered, error, final)
        except Exception:  # a store failure: the delivery stays due (or falls due at its deadline)
            log.exception("webhook try failed", extra={"delivery_id": delivery_id, "target": target})

    def _body(self, stored: bytes) -> bytes:
        """The body as sent: the stored one, with its images' URLs rendered when it names stored files."""
        if self._render is None or f'"{KEY_FIELD}"'.encode() not in stored:
            return stored
        message = json.loads(stored)
        if isinstance(message.get("payload"), dict):
            message["payload"] = self._render(message["payload"])
        return json.dumps(message, separators=(",", ":")).encode()

    async def _send(self, delivery: WebhookDelivery) -> tuple[bool, str, bool]:
        """Whether the receiver took it, what to record, and whether this try is the last either way."""
        body = self._body(delivery.body)
        headers = {"Content-Type": "application/json", WEBHOOK_ID_HEADER: webhook_id(delivery)}
        headers |= self._signer.sign_headers(delivery.request_id, delivery.user_id, body)
        try:
            code = await self._fetcher.post(delivery.url, body, headers)
        except FetchError as failure:
            # A refused URL stays refused (an address the guard never allows, a bad URL): no more tries.
            return False, failure.message, failure.refused
        delivered = 200 <= code < 300
        return delivered, f"HTTP {code}", delivered

    async def _record(
        self, delivery: WebhookDelivery, target: str, delivered: bool, error: str, final: bool
    ) -> None:
        tries = delivery.attempts + 1
        next_attempt = None
        if not final and tries <= len(self._backoff):
            next_attempt = time.time() + self._backoff[tries - 1]
        await asyncio.to_thread(
            self._store.webhook_attempted, delivery.delivery_id, delivered, next_attempt, error
        )
        metrics.webhook_attempt(delivered, next_attempt is not None)
        # Logged once stored: a kill after this line cannot lose or repeat what it reports.
        log.info(
            "webhook attempt",
            extra={
                "request_id": delivery.request_id,
                "webhook_id": webhook_id(delivery),
                "target": target,
                "try": tries,
                "delivered": delivered,
                "outcome": "delivered" if delivered else ("retry" if next_attempt is not None else "failed"),
                "error": None if delivered else error,
                "retry_in": None if next_attempt is None else round(next_attempt - time.time(), 1),
            },
        )

    async def _interrupt(self) -> None:
        """Shutdown: stop the tries in flight, and make them due again without counting them."""
        cut_short = dict(self._tries)
        for task in cut_short.values():
            task.cancel()
        await asyncio.gather(*cut_short.values(), return_exceptions=True)
        if not cut_short:
            return
        try:
            released = await asyncio.to_thread(self._store.release_webhooks, time.time(), list(cut_short))
        except Exception:  # the deadline, or the next start, makes them due all the same
            log.exception("could not release webhook tries cut short by shutdown")
            return
        log.info("webhook tries cut short by shutdown will be retried", extra={"count": released})
