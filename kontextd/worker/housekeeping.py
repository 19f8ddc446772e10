"""Periodic chores: expire missed start deadlines, re-queue work of dead workers, delete expired outputs,
and, a retention period later, the records left of those requests."""

import asyncio
import logging
import time

from kontextd.background import pause
from kontextd.config import SEVEN_DAYS
from kontextd.jobs.store import JobStore, StoreUnavailable
from kontextd.storage.base import Storage

log = logging.getLogger("kontextd.housekeeping")

BATCH = 500


def sweep_once(
    store: JobStore, storage: Storage, now: float, record_retention: float = SEVEN_DAYS
) -> dict[str, int]:
    counts = {
        "timed_out": store.expire_unstarted(now),
        "requeued": store.recover_abandoned(now),
        "expired": 0,
        "pruned": 0,
    }
    while expired := store.expired_outputs(now, BATCH):
        for request_id, keys in expired:
            for key in keys:
                storage.delete(key)
            store.mark_output_expired(request_id)  # files first: a crash in between deletes them again
        counts["expired"] += len(expired)
    while pruned := store.prune_records(now - record_retention, BATCH):
        counts["pruned"] += pruned
    return counts


async def sweep_forever(
    store: JobStore,
    storage: Storage,
    interval: float,
    stop: asyncio.Event,
    record_retention: float = SEVEN_DAYS,
) -> None:
    while not stop.is_set():
        try:
            counts = await asyncio.to_thread(sweep_once, store, storage, time.time(), record_retention)
            if any(counts.values()):
                log.info("swept", extra=counts)
        except StoreUnavailable as error:  # a full disk: say so once a sweep, without a traceback
            log.warning("sweep skipped: the store cannot take writes", extra={"reason": str(error)})
        except Exception:  # keep sweeping: a transient database error must not end housekeeping
            log.exception("sweep failed")
        await pause(stop, interval)
