"""Periodic chores: expire missed start deadlines, re-queue work of dead workers, delete expired outputs."""

import asyncio
import logging
import time

from kontextd.background import pause
from kontextd.jobs.store import JobStore
from kontextd.storage.base import Storage

log = logging.getLogger("kontextd.housekeeping")

BATCH = 500


def sweep_once(store: JobStore, storage: Storage, now: float) -> dict[str, int]:
    counts = {
        "timed_out": store.expire_unstarted(now),
        "requeued": store.recover_abandoned(now),
        "expired": 0,
    }
    while expired := store.expired_outputs(now, BATCH):
        for request_id, keys in expired:
            for key in keys:
                storage.delete(key)
            store.mark_output_expired(request_id)
        counts["expired"] += len(expired)
    return counts


async def sweep_forever(store: JobStore, storage: Storage, interval: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            counts = await asyncio.to_thread(sweep_once, store, storage, time.time())
            if any(counts.values()):
                log.info("swept", extra=counts)
        except Exception:  # keep sweeping: a transient database error must not end housekeeping
            log.exception("sweep failed")
        await pause(stop, interval)
