"""What status polls read, kept between changes: JobStore.poll() answered from memory when nothing changed.

Clients poll a request far more often than it changes. So a process answers a request polled again from
memory, and reads the store again only once it is told that something changed. Each store tells it:
SQLite's one process makes every change itself and drops everything at each commit; on PostgreSQL
every change is announced to every node (NOTIFY), naming the request. The rules, each for a reason:

- Polls are kept only while the cache is told every change (`set_coherent`). A PostgreSQL listener that
  lost its connection may have missed announcements: losing it drops everything, and nothing is kept
  until it listens again.
- A change to a request drops that request's polls and the poll of every queued request. A job that
  leaves or joins a lane moves the positions of those behind it, and its announcement names only itself
  (or its lane).
- A read under way when anything was dropped is not kept (the epoch moved): it may predate the change.
- A process's own writes drop what they change as they commit, before the write returns, so a client
  sees its own cancel at once. Another node's change is seen once its announcement arrives: well under a
  millisecond on loopback, a network round trip between machines.
- No poll is kept longer than `max_age` seconds, whatever happens: a safety net for a connection that
  died without a word (no FIN, no RST), which the listener notices only later. 0 keeps nothing.
- At most `max_entries` polls, the oldest dropped first: memory stays bounded however many are polled.
- The owner is checked on every call, against the owner read with the poll.

Thread-safe: announcements and commits arrive on threads, polls on the event loop.
"""

import threading
import time
from collections.abc import Awaitable, Callable, Iterable

from kontextd.jobs.model import Polled, State

MAX_AGE_SECONDS = 1.0
MAX_ENTRIES = 4096

Key = tuple[str, bool]  # request id, with the logs
Read = tuple[str, Polled]  # the request's owner, and what its poll reads


class PollCache:
    def __init__(
        self,
        max_age: float | None = None,
        max_entries: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # The module's limits as they are when a cache is made (a test may change them for a store).
        self._max_age = MAX_AGE_SECONDS if max_age is None else max_age
        self._max_entries = MAX_ENTRIES if max_entries is None else max_entries
        self._clock = clock
        self._lock = threading.Lock()
        # Queued requests' polls apart from the rest: any change anywhere drops them all (their positions).
        self._queued: dict[Key, tuple[float, Read]] = {}
        self._settled: dict[Key, tuple[float, Read]] = {}
        self._epoch = 0  # moves whenever anything is dropped
        self._coherent = False

    async def poll(
        self, request_id: str, owner: str | None, with_logs: bool, read: Callable[[], Awaitable[Read | None]]
    ) -> Polled | None:
        """What JobStore.poll() answers: the poll kept for this request, else `read()`'s (None: no such
        request), kept unless something changed meanwhile; None too when `owner` is not the request's."""
        key = (request_id, with_logs)
        found = self.get(key)
        if found is None:
            epoch = self.epoch()
            found = await read()
            if found is None:
                return None
            self.put(key, found, epoch)
        request_owner, polled = found
        return polled if owner is None or owner == request_owner else None

    def epoch(self) -> int:
        """Read before the store is: hand it to put() with what was read."""
        return self._epoch

    def get(self, key: Key) -> Read | None:
        with self._lock:
            if not self._coherent:
                return None
            entry = self._queued.get(key) or self._settled.get(key)
        if entry is None or self._clock() - entry[0] > self._max_age:
            return None
        return entry[1]

    def put(self, key: Key, found: Read, epoch: int) -> None:
        """Keep `found`, read from the store after epoch() gave `epoch`, unless something was dropped
        since: then it may predate a change, and the next poll reads again."""
        with self._lock:
            if not self._coherent or epoch != self._epoch or self._max_age <= 0:
                return
            self._queued.pop(key, None)
            self._settled.pop(key, None)
            kept = self._queued if found[1].summary.state == State.IN_QUEUE else self._settled
            if len(self._queued) + len(self._settled) >= self._max_entries:
                # Each dict keeps insertion order, so its first entry is its oldest.
                held = [entries for entries in (self._queued, self._settled) if entries]
                oldest = min(held, key=lambda entries: next(iter(entries.values()))[0])
                del oldest[next(iter(oldest))]
            kept[key] = (self._clock(), found)

    def changed(self, request_ids: Iterable[str]) -> None:
        """These requests changed (state, logs, cancel flag, a record pruned), or joined or left a lane."""
        with self._lock:
            self._epoch += 1
            self._queued.clear()
            for request_id in request_ids:
                self._settled.pop((request_id, False), None)
                self._settled.pop((request_id, True), None)

    def clear(self) -> None:
        """Anything may have changed."""
        with self._lock:
            self._drop_all()

    def set_coherent(self, coherent: bool) -> None:
        """Whether the cache is told every change from now on (a PostgreSQL listener has its LISTEN in place,
        or lost it). Either way, what was kept may be stale."""
        with self._lock:
            self._drop_all()
            self._coherent = coherent

    def _drop_all(self) -> None:
        self._epoch += 1
        self._queued.clear()
        self._settled.clear()
