"""Wake-ups for whoever waits on a request (status streams, sync runs) when a worker changes it.

Workers run in threads, so notify() hops onto the event loop. Waiters also re-read on a short timeout,
which covers changes made by other processes.
"""

import asyncio
from collections import defaultdict


class ChangeFeed:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiters: defaultdict[str, set[asyncio.Future[None]]] = defaultdict(set)

    def notify(self, request_id: str) -> None:
        """Thread-safe: callable from worker threads and the loop alike."""
        self._loop.call_soon_threadsafe(self._wake, request_id)

    def _wake(self, request_id: str) -> None:
        for waiter in self._waiters.pop(request_id, ()):
            if not waiter.done():
                waiter.set_result(None)

    def watch(self, request_id: str) -> asyncio.Future[None]:
        """Register interest before reading state, so a change in between is not missed."""
        waiter = self._loop.create_future()
        self._waiters[request_id].add(waiter)
        return waiter

    async def wait(self, request_id: str, waiter: asyncio.Future[None], timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            pass
        finally:
            waiters = self._waiters.get(request_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[request_id]
