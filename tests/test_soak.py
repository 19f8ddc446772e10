"""A bounded soak: bursts of concurrent requests, with idle gaps long enough for the API's threadpool to
retire its threads, must not grow the server's file descriptors or memory.

The threadpool (anyio) stops a worker thread once it has been idle for 10 s, at the next call that needs
one; the next burst starts new threads. Anything kept per thread (a database connection, say) leaks.
"""

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import KontextdServer, wait_for

from kontextd.jobs.sqlite import POOL_SIZE

APP_ID = "fal-ai/flux-pro/kontext/text-to-image"
PREFIX = "fal-ai/flux-pro"
BURSTS = 4
CLIENTS = 40  # concurrent clients in a burst: more than the pool has connections
RETIRE_SECONDS = 60  # the threadpool retires idle threads after 10 s; generous for a loaded machine
# Each connection holds the database file and its -wal; the -shm is mapped once per process.
MAX_DATABASE_HANDLES = 2 * POOL_SIZE + 1
FD_SLACK = 4  # sockets of clients still closing, a log file rotated: not a leak
# Memory after the last burst vs after the first (both warm): measured +0.5 MB; the per-thread connections
# of old grew it by about 4 MB a burst.
RSS_GROWTH_LIMIT_KB = 8 * 1024


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def descriptors(pid: int, database: Path) -> tuple[int, int]:
    """(all open file descriptors, those on the database and its -wal/-shm files)."""
    total = on_database = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed while we looked
            continue
        total += 1
        on_database += target.startswith(str(database))
    return total, on_database


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1])


class Peak:
    """Samples the server while a burst runs: the most threads and database handles seen at once."""

    def __init__(self, pid: int, database: Path) -> None:
        self.threads = self.database = 0
        self._pid, self._database = pid, database
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "Peak":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def _take(self) -> None:
        self.threads = max(self.threads, thread_count(self._pid))
        self.database = max(self.database, descriptors(self._pid, self._database)[1])

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self._take()


def submit(client: httpx.Client, seed: int) -> str:
    response = client.post(f"/{APP_ID}", json={"prompt": f"a soak test, take {seed}", "seed": seed})
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def one_client(client: httpx.Client, seed: int) -> None:
    """What a client does: submit, poll status, cancel (the writes run in the threadpool)."""
    request_id = submit(client, seed)
    for _ in range(2):
        status = client.get(f"/{PREFIX}/requests/{request_id}/status")
        assert status.status_code == 202, status.text
    cancelled = client.put(f"/{PREFIX}/requests/{request_id}/cancel")
    assert cancelled.status_code == 202, cancelled.text


def burst(client: httpx.Client, first_seed: int) -> None:
    start = threading.Barrier(CLIENTS)

    def together(seed: int) -> None:
        start.wait()
        one_client(client, seed)

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(together, range(first_seed, first_seed + CLIENTS)))


def until_threads_retire(client: httpx.Client, pid: int, target: int) -> int:
    """Nudge the threadpool (it retires idle threads only when next called) until the server is back to
    `target` threads or fewer; returns the count reached."""
    nudges = iter(range(10**6))

    def retired() -> int | None:
        submit(client, 100_000 + next(nudges))  # a submit always runs in the threadpool
        count = thread_count(pid)
        return count if count <= target else None

    return wait_for(retired, timeout=RETIRE_SECONDS, interval=0.5)


@pytest.fixture
def api_server(tmp_path: Path) -> Iterator[KontextdServer]:
    server = KontextdServer(tmp_path / "data", args=["--workers", "0"]).start()
    yield server
    server.stop()


def test_bursts_separated_by_idle_gaps_leak_no_descriptors_or_memory(api_server: KontextdServer) -> None:
    assert api_server.process is not None
    pid = api_server.process.pid
    database = api_server.data_dir.resolve() / "jobs.sqlite3"
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    after_retiring: list[tuple[int, int, int]] = []  # (descriptors, database handles, RSS kB) per burst
    churn = 0
    with api_server.client(limits=limits) as client:
        for number in range(BURSTS):
            before = thread_count(pid)
            with Peak(pid, database) as peak:
                burst(client, number * CLIENTS)
            assert peak.database <= MAX_DATABASE_HANDLES, (number, peak.database)
            reached = until_threads_retire(client, pid, before + 2)
            churn += peak.threads - reached
            total, on_database = descriptors(pid, database)
            assert on_database <= MAX_DATABASE_HANDLES, (number, on_database)
            after_retiring.append((total, on_database, rss_kb(pid)))
    # The bursts really started and retired threads: enough to exceed the pool many times over.
    assert churn >= 2 * POOL_SIZE, churn
    first, last = after_retiring[0], after_retiring[-1]
    # Database handles are bounded by the pool (asserted above), which opens connections lazily: a later
    # burst may open some the first did not need. Every other descriptor must come back to where it was.
    assert last[0] - last[1] <= first[0] - first[1] + FD_SLACK, after_retiring
    assert last[2] - first[2] <= RSS_GROWTH_LIMIT_KB, after_retiring
