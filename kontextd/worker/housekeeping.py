"""Periodic chores: expire missed start deadlines, re-queue work of dead workers, delete expired outputs
and uploads, and, a retention period later, the records left of those requests. Every node runs the loop;
the store's deployment-wide turn makes each sweep happen once, on whichever node holds it."""

import asyncio
import logging
import time

from kontextd.background import pause
from kontextd.config import SEVEN_DAYS
from kontextd.jobs.store import JobStore, StoreUnavailable
from kontextd.storage.base import Storage, StorageUnavailable

log = logging.getLogger("kontextd.housekeeping")

BATCH = 500


def sweep_once(
    store: JobStore,
    storage: Storage,
    now: float,
    record_retention: float = SEVEN_DAYS,
    lease_seconds: float = 0.0,
) -> dict[str, int]:
    counts = {
        "timed_out": store.expire_unstarted(now),
        "requeued": store.recover_abandoned(now, settle_seconds=lease_seconds),
        "expired": 0,
        "pruned": 0,
        "uploads_expired": 0,
    }
    while expired := store.expired_outputs(now, BATCH):
        # Files first, a batch at a time: a crash in between deletes them again at the next sweep.
        storage.delete([key for _, keys in expired for key in keys])
        for request_id, _ in expired:
            store.mark_output_expired(request_id)
        counts["expired"] += len(expired)
    while uploads := store.expired_uploads(now, BATCH):
        storage.delete(uploads)  # files first, as above: a record outlives its file, never the reverse
        store.forget_uploads(uploads)
        counts["uploads_expired"] += len(uploads)
    while pruned := store.prune_records(now - record_retention, BATCH):
        counts["pruned"] += pruned
    return counts


async def sweep_forever(
    store: JobStore,
    storage: Storage,
    interval: float,
    stop: asyncio.Event,
    record_retention: float = SEVEN_DAYS,
    lease_seconds: float = 0.0,
) -> None:
    def sweep_in_turn() -> dict[str, int] | None:
        with store.turn("sweep") as mine:
            if not mine:
                return None
            return sweep_once(store, storage, time.time(), record_retention, lease_seconds)

    while not stop.is_set():
        try:
            counts = await asyncio.to_thread(sweep_in_turn)
            if counts and any(counts.values()):
                log.info("swept", extra=counts)
        except StoreUnavailable as error:  # a full disk, a database down: said once a sweep, no traceback
            log.warning("sweep skipped: the store cannot take writes", extra={"reason": str(error)})
        except StorageUnavailable as error:
            log.warning("sweep stopped: expired outputs cannot be deleted now", extra={"reason": str(error)})
        except Exception:  # keep sweeping: a transient database error must not end housekeeping
            log.exception("sweep failed")
        await pause(stop, interval)
