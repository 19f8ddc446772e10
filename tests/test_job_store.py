"""The job store's behaviour, written against the JobStore protocol.

Every test that only uses the protocol runs once per store kind in STORES: the embedded SQLite store and
the shared PostgreSQL one (on a fresh schema per test: tests/pg_fixtures.py; skipped when the machine has
no PostgreSQL). Tests of the embedded store's own extras (recover_after_restart, the data-dir lock,
releasing every webhook in flight at start-up, snapshot reads) use the `sqlite_store` and `sqlite_path`
fixtures; their shared-store counterparts, and what only several processes on one database can show, are
in tests/test_postgres_store.py.
"""

import asyncio
import contextlib
import json
import os
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from bench.scratch_postgres import bulk
from kontextd.jobs import lifecycle, outcomes
from kontextd.jobs.lifecycle import MAX_FAILURES, MAX_INTERRUPTIONS, MAX_STORAGE_FAILURES
from kontextd.jobs.model import CancelResult, Job, NewJob, Outcome, Polled, Priority, Release, State, Usage
from kontextd.jobs.postgres import PostgresJobStore
from kontextd.jobs.sqlite import POOL_SIZE, DataDirInUse, SQLiteJobStore
from kontextd.jobs.store import JobStore, StoreUnavailable

APP_ID = "fal-ai/flux-kontext/dev"
LEASE = 60.0
# What the request's own logs say when it is queued again, by cause (part of what clients read).
WARN_REQUEUED = "The worker running this request stopped; it was queued again"
WARN_RESTARTED = "The server stopped while this request ran; it was queued again"
WARN_SHUTDOWN = "The server is shutting down; this request was queued again and runs again from the start"
WARN_STORAGE = "Its images could not be stored (disk full or storage unavailable); it was queued again"

# -- store construction: one factory per store kind ----------------------------------------------------

StoreOpener = Callable[[], JobStore]


def _sqlite_opener(request: pytest.FixtureRequest) -> StoreOpener:
    path = request.getfixturevalue("tmp_path") / "jobs.sqlite3"
    return lambda: SQLiteJobStore(path)


def _postgres_opener(request: pytest.FixtureRequest) -> StoreOpener:
    dsn = request.getfixturevalue("pg_dsn")  # a fresh schema: every store opened sees the same database
    return lambda: PostgresJobStore(dsn)


STORES: dict[str, Callable[[pytest.FixtureRequest], StoreOpener]] = {
    "sqlite": _sqlite_opener,
    "postgres": _postgres_opener,
}
BULK: dict[str, Callable[[JobStore], contextlib.AbstractContextManager[None]]] = {
    "sqlite": bulk,  # many submits per transaction, through submit itself
    "postgres": bulk,
}


@dataclass
class StoreKind:
    name: str
    open: StoreOpener


@pytest.fixture(params=sorted(STORES))
def store_kind(request: pytest.FixtureRequest) -> Iterator[StoreKind]:
    """Opens stores of one kind on one database; every store opened is closed at the end."""
    opened: list[JobStore] = []
    opener = STORES[request.param](request)

    def open_store() -> JobStore:
        store = opener()
        opened.append(store)
        return store

    yield StoreKind(request.param, open_store)
    for store in opened:
        with contextlib.suppress(Exception):
            store.close()


@pytest.fixture
def store(store_kind: StoreKind) -> JobStore:
    return store_kind.open()


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    return tmp_path / "jobs.sqlite3"


@pytest.fixture
def sqlite_store(sqlite_path: Path) -> Iterator[SQLiteJobStore]:
    store = SQLiteJobStore(sqlite_path)
    yield store
    store.close()


# -- helpers -----------------------------------------------------------------------------------------


def new_job(
    request_id: str | None = None,
    *,
    owner: str = "alice",
    priority: Priority = Priority.NORMAL,
    **fields: Any,
) -> NewJob:
    return NewJob(
        request_id=request_id or str(uuid.uuid4()),
        gateway_request_id=str(uuid.uuid4()),
        app_id=APP_ID,
        owner=owner,
        input={"prompt": "a cat", "image_url": "https://example.com/cat.png"},
        priority=priority,
        **fields,
    )


def submit_all(store: JobStore, names: list[str], priority: Priority = Priority.NORMAL) -> list[int]:
    return [store.submit(new_job(name, priority=priority)) for name in names]


def positions(store: JobStore, names: list[str]) -> list[int | None]:
    return [store.queue_position(name) for name in names]


def claim(store: JobStore, now: float, worker_id: str = "worker-a") -> Job | None:
    return store.claim(worker_id, LEASE, now)


def claimed_ids(store: JobStore, now: float) -> list[str]:
    ids = []
    while (job := claim(store, now)) is not None:
        ids.append(job.request_id)
    return ids


def get(store: JobStore, request_id: str) -> Job:
    job = store.get(request_id)
    assert job is not None
    return job


def succeeded(keys: tuple[str, ...] = ()) -> Outcome:
    return outcomes.succeeded({"images": [], "seed": 7, "prompt": "a cat"}, 1.25, keys, "local/tiny")


def invalid() -> Outcome:
    detail = [{"loc": ["body", "image_url"], "msg": "could not load", "type": "image_load_error"}]
    return outcomes.invalid_input(detail, "could not load")


# -- submit and claim ------------------------------------------------------------------------------


def test_submit_returns_exact_positions(store: JobStore) -> None:
    assert submit_all(store, ["n0", "n1", "n2"]) == [0, 1, 2]
    assert submit_all(store, ["l0", "l1"], Priority.LOW) == [3, 4]
    # A normal request goes ahead of every low one.
    assert store.submit(new_job("n3")) == 3
    assert positions(store, ["l0", "l1"]) == [4, 5]
    # A retry-level request goes ahead of everything.
    assert store.submit(new_job("r0", priority=Priority.RETRY)) == 0
    assert positions(store, ["n0", "n1", "n2", "n3", "l0", "l1"]) == [1, 2, 3, 4, 5, 6]


def test_submitted_job_is_stored_as_given(store: JobStore) -> None:
    job = new_job("a", webhook_url="https://hooks.example/x", priority=Priority.LOW)
    store.submit(job)
    stored = get(store, "a")
    assert stored.state is State.IN_QUEUE
    assert (stored.request_id, stored.gateway_request_id, stored.app_id, stored.owner) == (
        job.request_id,
        job.gateway_request_id,
        job.app_id,
        job.owner,
    )
    assert stored.input == job.input
    assert stored.priority is Priority.LOW
    assert stored.webhook_url == "https://hooks.example/x"
    assert stored.attempts == 0
    assert stored.started_at is None and stored.completed_at is None and stored.outcome is None
    assert not stored.cancel_requested and not stored.output_expired


def test_claim_order_is_retry_then_normal_then_low_fifo_within_a_level(store: JobStore) -> None:
    now = time.time()
    store.submit(new_job("low-1", priority=Priority.LOW))
    store.submit(new_job("normal-1"))
    store.submit(new_job("low-2", priority=Priority.LOW))
    store.submit(new_job("retry-1", priority=Priority.RETRY))
    store.submit(new_job("normal-2"))
    store.submit(new_job("retry-2", priority=Priority.RETRY))
    store.submit(new_job("normal-3"))
    assert claimed_ids(store, now) == [
        "retry-1",
        "retry-2",
        "normal-1",
        "normal-2",
        "normal-3",
        "low-1",
        "low-2",
    ]
    assert claim(store, now) is None


def test_a_preferred_job_close_behind_the_head_is_taken_first(store: JobStore) -> None:
    now = time.time()
    window = lifecycle.AFFINITY_WINDOW
    store.submit(new_job("head", affinity="b"))
    for index in range(1, window):
        store.submit(new_job(f"other-{index}"))
    store.submit(new_job("last-in-window", affinity="a"))  # exactly AFFINITY_WINDOW tickets behind
    store.submit(new_job("beyond-window", affinity="a"))
    store.submit(new_job("low", priority=Priority.LOW, affinity="a"))  # another level: never before the head

    job = store.claim("worker-a", LEASE, now, prefer={"a", "z"})
    assert job is not None and (job.request_id, job.affinity) == ("last-in-window", "a")
    assert store.queue_position("head") == 0 and store.queue_position("other-1") == 1  # holes counted
    assert store.queue_position("beyond-window") == window  # every job but the one taken is still ahead
    # Beyond the window, the head goes first even to a preferred worker; a head it prefers, at once.
    assert store.claim("worker-a", LEASE, now, prefer={"a"}).request_id == "head"
    assert store.claim("worker-b", LEASE, now, prefer={"other"}).request_id == "other-1"
    assert store.claim("worker-a", LEASE, now, prefer=set()).request_id == "other-2"


def test_a_preferred_job_past_its_start_deadline_is_not_started(store: JobStore) -> None:
    now = time.time()
    store.submit(new_job("head"))
    store.submit(new_job("late", affinity="a", start_deadline=now - 1))
    assert store.claim("worker-a", LEASE, now, prefer={"a"}).request_id == "head"
    assert claim(store, now) is None  # the late one is timed out on the way, as a head would be
    assert get(store, "late").outcome.error_type == "request_timeout"


def test_claim_marks_the_job_running(store: JobStore) -> None:
    now = time.time()
    store.submit(new_job("a"))
    job = claim(store, now)
    assert job is not None and job.request_id == "a"
    assert job.state is State.IN_PROGRESS
    assert job.started_at == pytest.approx(now)
    assert job.attempts == 1
    assert store.queue_position("a") is None
    assert get(store, "a").state is State.IN_PROGRESS


def test_empty_queue_claims_nothing(store: JobStore) -> None:
    assert claim(store, time.time()) is None


# -- queue positions -------------------------------------------------------------------------------


def test_queue_position_after_claims(store: JobStore) -> None:
    names = [f"n{i}" for i in range(6)]
    submit_all(store, names)
    now = time.time()
    assert claimed_ids_n(store, now, 2) == ["n0", "n1"]
    assert positions(store, names) == [None, None, 0, 1, 2, 3]
    assert claimed_ids_n(store, now, 1) == ["n2"]
    assert positions(store, names) == [None, None, None, 0, 1, 2]


def claimed_ids_n(store: JobStore, now: float, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        job = claim(store, now)
        assert job is not None
        ids.append(job.request_id)
    return ids


def test_queue_position_after_cancelling_in_the_middle_at_the_head_and_at_the_tail(store: JobStore) -> None:
    names = [f"n{i}" for i in range(6)]
    submit_all(store, names)
    now = time.time()
    assert store.cancel("n2", "alice", now) is CancelResult.CANCELLED
    assert positions(store, names) == [0, 1, None, 2, 3, 4]
    assert store.cancel("n0", "alice", now) is CancelResult.CANCELLED
    assert positions(store, names) == [None, 0, None, 1, 2, 3]
    assert store.cancel("n5", "alice", now) is CancelResult.CANCELLED
    assert positions(store, names) == [None, 0, None, 1, 2, None]
    assert store.cancel("n3", "alice", now) is CancelResult.CANCELLED
    assert positions(store, names) == [None, 0, None, None, 1, None]
    # New arrivals queue behind what is left, and the claim order skips the cancelled ones.
    assert store.submit(new_job("n6")) == 2
    assert claimed_ids(store, now) == ["n1", "n4", "n6"]


def test_queue_position_across_levels(store: JobStore) -> None:
    normal = [f"n{i}" for i in range(5)]
    low = [f"l{i}" for i in range(3)]
    assert submit_all(store, normal) == [0, 1, 2, 3, 4]
    assert submit_all(store, low, Priority.LOW) == [5, 6, 7]
    now = time.time()
    claimed_ids_n(store, now, 2)
    assert positions(store, normal + low) == [None, None, 0, 1, 2, 3, 4, 5]
    assert store.cancel("n3", "alice", now) is CancelResult.CANCELLED
    assert positions(store, normal + low) == [None, None, 0, None, 1, 2, 3, 4]
    assert store.cancel("l1", "alice", now) is CancelResult.CANCELLED
    assert positions(store, low) == [2, None, 3]
    # A later normal request overtakes the low ones; a retry-level one overtakes everybody.
    assert store.submit(new_job("n5")) == 2
    assert positions(store, low) == [3, None, 4]
    assert store.submit(new_job("r0", priority=Priority.RETRY)) == 0
    assert positions(store, ["n2", "n4", "n5", "l0", "l2"]) == [1, 2, 3, 4, 5]
    # Emptying the normal level leaves the low ones at the front.
    assert claimed_ids_n(store, now, 4) == ["r0", "n2", "n4", "n5"]
    assert positions(store, low) == [0, None, 1]


def test_each_lane_is_its_own_queue(store: JobStore) -> None:
    """A backend's workers take only their lane's jobs; positions count only the jobs they wait behind."""
    now = time.time()
    assert store.submit(new_job("local-1")) == 0
    assert store.submit(new_job("bfl-1", lane="bfl")) == 0
    assert store.submit(new_job("local-2")) == 1
    assert store.submit(new_job("bfl-2", lane="bfl", priority=Priority.LOW)) == 1
    assert store.submit(new_job("bfl-3", lane="bfl")) == 1  # normal runs before low, in its lane
    assert store.claim("upstream", LEASE, now, "fal") is None
    job = store.claim("upstream", LEASE, now, "bfl")
    assert job is not None and (job.request_id, job.lane) == ("bfl-1", "bfl")
    assert [store.queue_position(name) for name in ("local-1", "local-2", "bfl-3", "bfl-2")] == [0, 1, 0, 1]
    assert claimed_ids(store, now) == ["local-1", "local-2"]  # the default lane is the local model's
    assert store.queue_position("bfl-2") == 1
    for name in ("local-1", "local-2"):
        assert store.complete(name, succeeded(), now, worker_id="worker-a") is True
    # A job whose worker died goes back to the head of its own lane.
    assert store.recover_abandoned(now + LEASE + 1) == 1
    assert [store.queue_position(name) for name in ("bfl-1", "bfl-3", "bfl-2")] == [0, 1, 2]


def test_queue_depths_count_each_lane_and_its_oldest_submit(store: JobStore) -> None:
    """What /metrics shows per lane: queued jobs only (running and ended ones are not waiting)."""
    assert store.queue_depths() == {}
    before = time.time()
    store.submit(new_job("local-1"))
    store.submit(new_job("bfl-1", lane="bfl"))
    store.submit(new_job("local-2", priority=Priority.LOW))
    store.submit(new_job("local-3"))
    after = time.time()
    depths = store.queue_depths()
    assert {lane: depth.depth for lane, depth in depths.items()} == {"local": 3, "bfl": 1}
    assert all(before <= depth.oldest_created_at <= after for depth in depths.values())
    assert claim(store, after) is not None  # local-1 runs: no longer queued
    store.cancel("local-3", "alice", after)
    assert {lane: depth.depth for lane, depth in store.queue_depths().items()} == {"local": 1, "bfl": 1}
    oldest = store.queue_depths()["local"].oldest_created_at
    assert oldest == get(store, "local-2").created_at


def test_move_to_lanes_follows_a_routing_change_keeping_order(store: JobStore) -> None:
    now = time.time()
    other = "fal-ai/flux-pro/kontext"
    store.submit(new_job("local-a"))
    store.submit(new_job("bfl-low", lane="bfl", priority=Priority.LOW))
    store.submit(new_job("bfl-a", lane="bfl"))
    store.submit(new_job("bfl-b", lane="bfl"))
    store.submit(replace(new_job("dev-bfl", lane="bfl"), app_id=other))
    # APP_ID is now routed to the local model; the other endpoint stays where it is.
    assert store.move_to_lanes({APP_ID: "local", other: "bfl"}) == 3
    assert [store.queue_position(name) for name in ("local-a", "bfl-a", "bfl-b", "bfl-low")] == [0, 1, 2, 3]
    assert store.queue_position("dev-bfl") == 0
    assert store.move_to_lanes({APP_ID: "local", other: "bfl"}) == 0
    assert claimed_ids(store, now) == ["local-a", "bfl-a", "bfl-b", "bfl-low"]
    job = store.claim("upstream", LEASE, now, "bfl")
    assert job is not None and job.request_id == "dev-bfl"


def test_queue_position_is_none_for_unknown_running_and_completed_jobs(store: JobStore) -> None:
    now = time.time()
    submit_all(store, ["a", "b"])
    claim(store, now)
    assert store.complete("b", succeeded(), now) is True
    assert positions(store, ["a", "b", "unknown"]) == [None, None, None]


@dataclass
class _Modelled:
    priority: Priority
    seq: int
    deadline: float | None
    lane: str = "local"
    failures: int = 0
    cancel_requested: bool = False
    lease_expires_at: float = 0.0


STEPS = 500
LANES = ("local", "bfl")


def test_queue_positions_match_a_brute_force_model(store: JobStore) -> None:
    """Random submits (random priority, some with start deadlines), claims, cancels, completions, lease
    recoveries and deadline sweeps; after every operation each queued job's position must equal its index
    in the queued jobs of its lane sorted by (priority, order of entering the queue). Two lanes (backends)
    share the store, each claimed by its own workers."""
    rng = random.Random(1234)
    base = time.time()
    queued: dict[str, _Modelled] = {}
    running: dict[str, _Modelled] = {}
    finished: dict[str, str | None] = {}  # request_id -> error_type
    seq = 0
    counter = 0

    def order(lane: str) -> list[str]:
        in_lane = [name for name in queued if queued[name].lane == lane]
        return sorted(in_lane, key=lambda name: (queued[name].priority, queued[name].seq))

    def check(step: int, operation: str, seen_finished: int) -> None:
        expected = {name: index for lane in LANES for index, name in enumerate(order(lane))}
        every = step % 50 == 0 or step == STEPS - 1  # finished jobs stay finished: re-read them now and then
        ended = list(finished)[0 if every else seen_finished :]
        for name in [*queued, *running, *ended]:
            assert store.queue_position(name) == expected.get(name), (step, operation, name)
        for name in running:
            assert get(store, name).state is State.IN_PROGRESS, (step, operation, name)
        for name in ended:
            error_type = finished[name]
            job = get(store, name)
            assert job.state is State.COMPLETED, (step, operation, name)
            assert job.outcome is not None and job.outcome.error_type == error_type, (step, operation, name)

    operations = ["submit"] * 30 + ["claim"] * 18 + ["cancel_queued"] * 9 + ["cancel_running"] * 4
    operations += ["complete"] * 12 + ["recover"] * 8 + ["expire"] * 3
    stats: dict[str, int] = {}
    for step in range(STEPS):
        seen_finished = len(finished)
        now = base + step  # every operation happens one second after the previous one
        operation = rng.choice(operations)
        if operation == "submit":
            counter += 1
            name = f"job-{counter}"
            priority = rng.choice(
                [Priority.RETRY, Priority.NORMAL, Priority.NORMAL, Priority.LOW, Priority.LOW]
            )
            deadline = now + rng.randint(1, 40) + 0.5 if rng.random() < 0.25 else None
            lane = rng.choice(LANES)
            position = store.submit(new_job(name, priority=priority, start_deadline=deadline, lane=lane))
            seq += 1
            queued[name] = _Modelled(priority, seq, deadline, lane)
            assert position == order(lane).index(name), (step, operation)
        elif operation == "claim":
            # Later claims get earlier-lapsing leases, so the job most recently (re)started is the one
            # the next lease sweep recovers: some jobs die again and again until MAX_FAILURES.
            lease = 1_000_000.0 - 2 * step
            lane = rng.choice(LANES)
            expected_claim = None
            for name in order(lane):
                item = queued.pop(name)
                if item.deadline is not None and item.deadline < now:
                    finished[name] = "request_timeout"
                    continue
                item.lease_expires_at = now + lease
                running[name] = item
                expected_claim = name
                break
            job = store.claim("worker-a", lease, now, lane)
            assert (job.request_id if job else None) == expected_claim, (step, operation)
            assert job is None or job.lane == lane
        elif operation == "cancel_queued" and queued:
            name = rng.choice(sorted(queued))
            assert store.cancel(name, "alice", now) is CancelResult.CANCELLED
            del queued[name]
            finished[name] = "client_cancelled"
        elif operation == "cancel_running" and running:
            name = rng.choice(sorted(running))
            assert store.cancel(name, "alice", now) is CancelResult.REQUESTED
            running[name].cancel_requested = True
        elif operation == "complete" and running:
            name = rng.choice(sorted(running))
            assert store.complete(name, succeeded(), now, worker_id="worker-a") is True
            del running[name]
            finished[name] = None
        elif operation == "recover" and running:
            # Let exactly one lease lapse (leases lapse whole seconds apart).
            name = min(running, key=lambda candidate: running[candidate].lease_expires_at)
            item = running[name]
            if item.deadline is not None:
                continue  # whether a restarted request keeps its start deadline is not this test's business
            assert store.recover_abandoned(item.lease_expires_at + 0.5) == 1, (step, operation)
            stats["recovered"] = stats.get("recovered", 0) + 1
            del running[name]
            item.failures += 1
            if item.cancel_requested:
                finished[name] = "client_cancelled"
            elif item.failures >= MAX_FAILURES:
                finished[name] = "internal_server_error"
            else:
                seq += 1
                item.priority, item.seq = Priority.RETRY, seq
                queued[name] = item
        elif operation == "expire":
            expired = [
                name for name, item in queued.items() if item.deadline is not None and item.deadline < now
            ]
            assert store.expire_unstarted(now) == len(expired), (step, operation)
            for name in expired:
                del queued[name]
                finished[name] = "request_timeout"
        check(step, operation, seen_finished)
    # The run exercised every path it is meant to.
    assert len(finished) > 50 and len(queued) > 5
    assert {"request_timeout", "client_cancelled", "internal_server_error", None} <= set(finished.values())
    assert stats.get("recovered", 0) >= 5


def test_queue_position_does_not_scan_the_queue(store_kind: StoreKind, store: JobStore) -> None:
    """A sanity check, not a benchmark: the last of 20,000 queued jobs is about as cheap as the first."""
    total = 20_000
    bulk = BULK.get(store_kind.name, contextlib.nullcontext)
    with bulk(store):  # type: ignore[operator]
        for index in range(total):
            store.submit(new_job(f"job-{index}", priority=Priority.LOW if index % 2 else Priority.NORMAL))
    first, last = "job-0", f"job-{total - 1}"

    def fastest(request_id: str) -> float:
        best = float("inf")
        for _ in range(30):
            started = time.perf_counter()
            store.queue_position(request_id)
            best = min(best, time.perf_counter() - started)
        return best

    assert store.queue_position(first) == 0
    assert store.queue_position(last) == total - 1
    first_seconds, last_seconds = fastest(first), fastest(last)
    assert last_seconds < 20 * first_seconds + 0.002, (first_seconds, last_seconds)


# -- complete --------------------------------------------------------------------------------------


def test_complete_happens_exactly_once(store: JobStore) -> None:
    now = time.time()
    store.submit(new_job("a"))
    claim(store, now, worker_id="worker-a")
    assert store.complete("a", succeeded(), now + 1, worker_id="worker-b") is False
    assert get(store, "a").state is State.IN_PROGRESS
    assert store.complete("a", succeeded(("a/0.png",)), now + 2, worker_id="worker-a") is True
    assert store.complete("a", invalid(), now + 3, worker_id="worker-a") is False
    assert store.complete("a", invalid(), now + 3) is False
    job = get(store, "a")
    assert job.state is State.COMPLETED
    assert job.completed_at == pytest.approx(now + 2)
    assert job.outcome == succeeded(("a/0.png",))
    assert job.outcome is not None and job.outcome.ok
    assert store.complete("unknown", succeeded(), now) is False


def test_complete_with_a_worker_id_refuses_a_queued_job(store: JobStore) -> None:
    now = time.time()
    store.submit(new_job("a"))
    assert store.complete("a", succeeded(), now, worker_id="worker-a") is False
    assert store.queue_position("a") == 0


def test_complete_without_a_worker_id_ends_a_queued_job(store: JobStore) -> None:
    now = time.time()
    submit_all(store, ["a", "b", "c"])
    assert store.complete("b", invalid(), now) is True
    assert positions(store, ["a", "b", "c"]) == [0, None, 1]
    assert claimed_ids(store, now) == ["a", "c"]


def test_a_worker_whose_job_was_taken_over_cannot_complete_it(store: JobStore) -> None:
    now = time.time()
    store.submit(new_job("a"))
    store.claim("worker-old", 10.0, now)
    assert store.recover_abandoned(now + 11) == 1
    job = store.claim("worker-new", 10.0, now + 12)
    assert job is not None and job.request_id == "a" and job.attempts == 2
    assert store.complete("a", succeeded(), now + 13, worker_id="worker-old") is False
    assert store.renew_lease("a", "worker-old", 10.0, now + 13) is False
    assert store.complete("a", succeeded(), now + 13, worker_id="worker-new") is True


# -- cancel ----------------------------------------------------------------------------------------


def test_cancel_results(store: JobStore) -> None:
    now = time.time()
    submit_all(store, ["running", "queued", "done"])
    claim(store, now)
    store.complete("done", succeeded(), now)

    assert store.cancel("unknown", "alice", now) is CancelResult.NOT_FOUND
    assert store.cancel("queued", "mallory", now) is CancelResult.NOT_FOUND
    assert store.cancel("running", "mallory", now) is CancelResult.NOT_FOUND
    assert get(store, "queued").state is State.IN_QUEUE
    assert not store.cancel_requested("running")

    assert store.cancel("queued", "alice", now + 1) is CancelResult.CANCELLED
    job = get(store, "queued")
    assert job.state is State.COMPLETED
    assert job.completed_at == pytest.approx(now + 1)
    assert job.outcome is not None
    assert job.outcome.error_type == "client_cancelled"
    assert job.outcome.status_code == 400
    assert job.outcome.body == {
        "detail": "Request was cancelled by the client",
        "error_type": "client_cancelled",
    }

    assert store.cancel("running", "alice", now) is CancelResult.REQUESTED
    assert store.cancel_requested("running")
    running = get(store, "running")
    assert running.cancel_requested and running.state is State.IN_PROGRESS

    assert store.cancel("done", "alice", now) is CancelResult.ALREADY_COMPLETED
    assert store.cancel("queued", "alice", now) is CancelResult.ALREADY_COMPLETED
    assert not store.cancel_requested("done")
    assert not store.cancel_requested("unknown")


# -- start deadlines -------------------------------------------------------------------------------


def assert_timed_out(store: JobStore, request_id: str, now: float) -> None:
    job = get(store, request_id)
    assert job.state is State.COMPLETED
    assert job.completed_at == pytest.approx(now)
    assert job.started_at is None
    assert job.outcome is not None
    assert job.outcome.status_code == 504
    assert job.outcome.error_type == "request_timeout"
    assert job.outcome.body == {"detail": "Request timed out", "error_type": "request_timeout"}


def test_claim_skips_and_times_out_a_job_whose_start_deadline_passed(store: JobStore) -> None:
    now = time.time()
    store.submit(new_job("late-1", start_deadline=now - 1))
    store.submit(new_job("on-time", start_deadline=now + 60))
    store.submit(new_job("late-2", start_deadline=now - 0.5))
    store.submit(new_job("no-deadline"))
    job = claim(store, now)
    assert job is not None and job.request_id == "on-time"
    assert_timed_out(store, "late-1", now)
    assert positions(store, ["late-2", "no-deadline"]) == [0, 1]
    job = claim(store, now)
    assert job is not None and job.request_id == "no-deadline"
    assert_timed_out(store, "late-2", now)
    assert claim(store, now) is None


def test_a_start_deadline_of_exactly_now_still_starts(store: JobStore) -> None:
    now = time.time()
    store.submit(new_job("due-now", start_deadline=now))
    store.submit(new_job("due-later", start_deadline=now + 1))
    job = claim(store, now)
    assert job is not None and job.request_id == "due-now" and job.state is State.IN_PROGRESS
    assert job.attempts == 1 and job.started_at == now
    assert positions(store, ["due-later"]) == [0]  # it left the queue: the next one moved to the head
    job = claim(store, now + 1)
    assert job is not None and job.request_id == "due-later"
    assert claim(store, now + 1) is None


def test_expire_unstarted_times_out_queued_jobs_whose_deadline_passed(store: JobStore) -> None:
    now = time.time()
    store.submit(new_job("n0"))
    store.submit(new_job("late", start_deadline=now + 5))
    store.submit(new_job("later", start_deadline=now + 50, priority=Priority.LOW))
    store.submit(new_job("n1"))
    store.submit(new_job("l0", priority=Priority.LOW))
    store.submit(new_job("running", start_deadline=now + 5, priority=Priority.RETRY))
    assert claim(store, now) is not None  # "running" has started: its deadline no longer applies
    assert store.expire_unstarted(now + 4) == 0
    assert store.expire_unstarted(now + 6) == 1
    assert_timed_out(store, "late", now + 6)
    assert get(store, "running").state is State.IN_PROGRESS
    assert positions(store, ["n0", "late", "n1", "later", "l0"]) == [0, None, 1, 2, 3]
    assert store.expire_unstarted(now + 51) == 1
    assert_timed_out(store, "later", now + 51)
    assert positions(store, ["n0", "n1", "l0"]) == [0, 1, 2]
    assert store.expire_unstarted(now + 100) == 0
    assert claimed_ids(store, now + 100) == ["n0", "n1", "l0"]


# -- checkpoints: what a run keeps for a re-run to resume --------------------------------------------


def test_checkpoints_are_kept_only_by_the_running_worker(store: JobStore) -> None:
    now = time.time()
    submit_all(store, ["a", "queued"])
    job = claim(store, now)
    assert job is not None and job.checkpoints == {}
    assert store.checkpoint("a", "worker-a", "task 1", "https://upstream.example/poll?id=1") is True
    assert store.checkpoint("a", "worker-a", "task 2", "") is True  # an empty value is a value
    assert store.checkpoint("a", "worker-a", "task 1", "https://upstream.example/poll?id=3") is True
    assert store.checkpoint("a", "worker-b", "task 9", "x") is False  # not this worker's job
    assert store.checkpoint("queued", "worker-a", "task 1", "x") is False
    assert store.checkpoint("unknown", "worker-a", "task 1", "x") is False
    expected = {"task 1": "https://upstream.example/poll?id=3", "task 2": ""}
    assert get(store, "a").checkpoints == expected
    assert get(store, "queued").checkpoints == {}
    # Names and values are kept as they are, quotes, dots and all.
    odd = {'a "quoted" $.name': 'va"lue\\', "ünï": "\n"}
    for name, value in odd.items():
        assert store.checkpoint("a", "worker-a", name, value) is True
    assert get(store, "a").checkpoints == expected | odd


@pytest.mark.parametrize("stop", ["shutdown", "lapsed", "restart"])
def test_a_re_run_gets_the_checkpoints_of_the_run_before(store: JobStore, stop: str) -> None:
    now = time.time()
    submit_all(store, ["a"])
    assert claim(store, now) is not None
    assert store.checkpoint("a", "worker-a", "task 1", "handle-1")
    if stop == "shutdown":
        assert store.release("a", "worker-a", Release.SHUTDOWN, now + 1) is State.IN_QUEUE
    elif stop == "lapsed":
        assert store.recover_abandoned(now + LEASE + 1) == 1
    elif store.shared:  # a shared store re-queues nothing at start-up: the lease lapses instead
        assert store.recover_after_restart(now + 1) == 0
        assert store.recover_abandoned(now + LEASE + 1) == 1
    else:
        assert store.recover_after_restart(now + 1) == 1
    job = claim(store, now + LEASE + 2, worker_id="worker-b")
    assert job is not None and job.attempts == 2 and job.checkpoints == {"task 1": "handle-1"}
    assert store.checkpoint("a", "worker-a", "task 1", "stale") is False  # the first worker's is over
    assert store.checkpoint("a", "worker-b", "task 2", "handle-2") is True
    assert get(store, "a").checkpoints == {"task 1": "handle-1", "task 2": "handle-2"}


def test_checkpoints_go_when_the_job_ends(store: JobStore) -> None:
    now = time.time()
    submit_all(store, ["a", "b"])
    assert claim(store, now) is not None and claim(store, now) is not None
    assert store.checkpoint("a", "worker-a", "task 1", "handle-a")
    assert store.checkpoint("b", "worker-a", "task 1", "handle-b")
    assert store.complete("a", succeeded(), now + 1, worker_id="worker-a") is True
    assert store.complete("b", succeeded(), now + 1) is True  # ended by anyone, without a worker id
    assert get(store, "a").checkpoints == {} and get(store, "b").checkpoints == {}
    assert store.checkpoint("a", "worker-a", "task 2", "late") is False


# -- leases and recovery ---------------------------------------------------------------------------


def test_renew_lease(store: JobStore) -> None:
    now = time.time()
    submit_all(store, ["a", "b"])
    store.claim("worker-a", 10.0, now)
    assert store.renew_lease("a", "worker-a", 10.0, now + 8) is True
    assert store.renew_lease("a", "worker-b", 10.0, now + 8) is False
    assert store.renew_lease("b", "worker-a", 10.0, now + 8) is False  # queued, not this worker's
    assert store.renew_lease("unknown", "worker-a", 10.0, now + 8) is False
    # The lease now runs to now + 18: a sweep at now + 15 leaves the job alone.
    assert store.recover_abandoned(now + 15) == 0
    assert get(store, "a").state is State.IN_PROGRESS
    assert store.recover_abandoned(now + 19) == 1
    assert store.renew_lease("a", "worker-a", 10.0, now + 19) is False


def test_recover_abandoned_only_touches_jobs_whose_lease_expired(store: JobStore) -> None:
    now = time.time()
    submit_all(store, ["short", "long", "n0"])
    submit_all(store, ["l0"], Priority.LOW)
    store.claim("worker-a", 10.0, now)  # short: lease to now + 10
    store.claim("worker-b", 100.0, now)  # long: lease to now + 100
    assert store.recover_abandoned(now + 5) == 0
    assert store.recover_abandoned(now + 11) == 1
    short = get(store, "short")
    assert short.state is State.IN_QUEUE
    assert short.priority is Priority.RETRY
    assert short.started_at is None
    assert short.attempts == 1
    assert get(store, "long").state is State.IN_PROGRESS
    # Re-queued ahead of everything else.
    assert positions(store, ["short", "n0", "l0"]) == [0, 1, 2]
    assert [line.message for line in store.logs("short")] == [WARN_REQUEUED]
    assert store.logs("short")[0].level == "WARN"
    assert store.logs("long") == []
    job = store.claim("worker-c", 10.0, now + 12)
    assert job is not None and job.request_id == "short" and job.attempts == 2


def test_recover_abandoned_ends_a_job_that_died_too_often(store: JobStore) -> None:
    now = time.time()
    store.submit(new_job("a"))
    for lapse in range(1, MAX_FAILURES + 1):
        job = store.claim("worker-a", 10.0, now)
        assert job is not None and job.attempts == lapse
        now += 11
        assert store.recover_abandoned(now) == 1
        job = get(store, "a")
        assert job.failures == lapse and job.interruptions == job.storage_failures == 0
        # Exactly MAX_FAILURES lapses end it: one fewer re-queues it.
        assert job.state is (State.COMPLETED if lapse == MAX_FAILURES else State.IN_QUEUE), lapse
    assert job.outcome is not None
    assert job.outcome.error_type == "internal_server_error"
    assert job.outcome.status_code == 500
    assert job.outcome.error == f"The worker running this request stopped {MAX_FAILURES} times"
    assert [line.message for line in store.logs("a")] == [WARN_REQUEUED] * (MAX_FAILURES - 1)
    assert claim(store, now) is None


def test_recover_abandoned_ends_a_no_retry_job_and_a_cancel_requested_one(store: JobStore) -> None:
    now = time.time()
    store.submit(new_job("no-retry", no_retry=True))
    store.submit(new_job("cancelled"))
    store.claim("worker-a", 10.0, now)
    store.claim("worker-a", 10.0, now)
    assert store.cancel("cancelled", "alice", now) is CancelResult.REQUESTED
    assert store.recover_abandoned(now + 11) == 2
    no_retry, cancelled = get(store, "no-retry"), get(store, "cancelled")
    assert no_retry.outcome is not None and no_retry.outcome.error_type == "internal_server_error"
    assert cancelled.outcome is not None and cancelled.outcome.error_type == "client_cancelled"
    assert no_retry.state is cancelled.state is State.COMPLETED


def counts(job: Job) -> tuple[int, int, int]:
    return job.failures, job.interruptions, job.storage_failures


def test_release_for_a_shutdown_requeues_at_the_head_and_counts_nothing(store: JobStore) -> None:
    now = time.time()
    store.submit(new_job("running", start_deadline=now + 5))
    submit_all(store, ["n0"])
    submit_all(store, ["l0"], Priority.LOW)
    # More shutdowns than any limit allows for anything: none of them is the request's doing.
    shutdowns = MAX_FAILURES + MAX_INTERRUPTIONS + MAX_STORAGE_FAILURES
    for turn in range(shutdowns):
        job = store.claim("worker-a", LEASE, now + turn)
        assert job is not None and job.request_id == "running"
        assert store.release("running", "worker-a", Release.SHUTDOWN, now + turn) is State.IN_QUEUE
        job = get(store, "running")
        assert (job.state, job.priority, job.started_at) == (State.IN_QUEUE, Priority.RETRY, None)
        assert counts(job) == (0, 0, 0)
        assert positions(store, ["running", "n0", "l0"]) == [0, 1, 2]
    assert [line.message for line in store.logs("running")] == [WARN_SHUTDOWN] * shutdowns
    assert {line.level for line in store.logs("running")} == {"WARN"}
    # It had started in time: its start deadline no longer applies to the re-run.
    job = store.claim("worker-b", LEASE, now + 60)
    assert job is not None and job.request_id == "running" and job.attempts == shutdowns + 1
    assert store.complete("running", succeeded(), now + 61, worker_id="worker-b") is True


def test_release_touches_only_this_workers_running_job(store: JobStore) -> None:
    now = time.time()
    submit_all(store, ["running", "queued", "done"])
    claim(store, now)
    store.complete("done", succeeded(), now)
    for reason in Release:
        assert store.release("running", "worker-b", reason, now) is None
        assert store.release("queued", "worker-a", reason, now) is None
        assert store.release("done", "worker-a", reason, now) is None
        assert store.release("unknown", "worker-a", reason, now) is None
    assert get(store, "running").state is State.IN_PROGRESS
    assert positions(store, ["running", "queued"]) == [None, 0]
    assert get(store, "done").outcome == succeeded()
    assert counts(get(store, "running")) == (0, 0, 0)
    assert store.logs("running") == store.logs("queued") == store.logs("done") == []


def test_release_ends_a_cancelled_job_and_a_no_retry_one(store: JobStore) -> None:
    now = time.time()
    for name in ["cancelled", "no-retry", "no-retry-storage"]:
        store.submit(new_job(name, no_retry=name.startswith("no-retry")))
        claim(store, now)
    assert store.cancel("cancelled", "alice", now) is CancelResult.REQUESTED
    assert store.release("cancelled", "worker-a", Release.SHUTDOWN, now) is State.COMPLETED
    assert store.release("no-retry", "worker-a", Release.SHUTDOWN, now) is State.COMPLETED
    assert store.release("no-retry-storage", "worker-a", Release.STORAGE_FULL, now) is State.COMPLETED
    ended = {name: get(store, name).outcome for name in ["cancelled", "no-retry", "no-retry-storage"]}
    assert ended["cancelled"] is not None and ended["cancelled"].error_type == "client_cancelled"
    assert ended["no-retry"] is not None and ended["no-retry"].error_type == "internal_server_error"
    assert "x-fal-no-retry" in (ended["no-retry"].error or "")
    assert ended["no-retry-storage"] is not None
    assert (ended["no-retry-storage"].status_code, ended["no-retry-storage"].error_type) == (
        503,
        "storage_error",
    )
    assert claim(store, now) is None


def test_storage_failures_requeue_until_the_limit_then_end_with_storage_error(store: JobStore) -> None:
    now = time.time()
    store.submit(new_job("a", webhook_url="https://hooks.example/a"))
    for failure in range(1, MAX_STORAGE_FAILURES + 1):
        job = store.claim("worker-a", LEASE, now + failure)
        assert job is not None and job.request_id == "a"
        state = store.release("a", "worker-a", Release.STORAGE_FULL, now + failure)
        # Exactly MAX_STORAGE_FAILURES end it: one fewer re-queues it.
        assert state is (State.COMPLETED if failure == MAX_STORAGE_FAILURES else State.IN_QUEUE), failure
        assert counts(get(store, "a")) == (0, 0, failure)
    job = get(store, "a")
    assert job.outcome is not None
    assert (job.outcome.status_code, job.outcome.error_type) == (503, "storage_error")
    assert job.outcome.error is not None and "storage is full or unavailable" in job.outcome.error
    assert job.outcome.body == {"detail": job.outcome.error, "error_type": "storage_error"}
    assert [line.message for line in store.logs("a")] == [WARN_STORAGE] * (MAX_STORAGE_FAILURES - 1)
    assert len(store.webhook_deliveries("a")) == 1  # its end is notified like any other


def test_each_cause_of_a_rerun_is_counted_on_its_own(store: JobStore) -> None:
    """One short of every limit at once still runs again: no cause is charged for another's."""
    now = time.time()
    store.submit(new_job("a"))
    for _ in range(MAX_FAILURES - 1):
        store.claim("worker-a", 10.0, now)
        now += 11
        assert store.recover_abandoned(now) == 1
    for _ in range(MAX_STORAGE_FAILURES - 1):
        store.claim("worker-a", 10.0, now)
        assert store.release("a", "worker-a", Release.STORAGE_FULL, now) is State.IN_QUEUE
    store.claim("worker-a", 10.0, now)
    assert store.release("a", "worker-a", Release.SHUTDOWN, now) is State.IN_QUEUE
    job = get(store, "a")
    assert job.state is State.IN_QUEUE
    assert counts(job) == (MAX_FAILURES - 1, 0, MAX_STORAGE_FAILURES - 1)
    job = store.claim("worker-b", LEASE, now)
    assert job is not None and job.request_id == "a"
    assert store.complete("a", succeeded(), now, worker_id="worker-b") is True


# -- logs ------------------------------------------------------------------------------------------


def test_logs_are_read_back_in_order(store: JobStore) -> None:
    now = time.time()
    submit_all(store, ["a", "b"])
    store.append_log("a", "first", "INFO", now)
    store.append_log("b", "other request", "INFO", now)
    store.append_log("a", "second", "WARN", now + 1)
    store.append_log("a", "third", "ERROR", now + 0.5)  # order is append order, not timestamp order
    lines = store.logs("a")
    assert [(line.message, line.level) for line in lines] == [
        ("first", "INFO"),
        ("second", "WARN"),
        ("third", "ERROR"),
    ]
    assert [line.timestamp for line in lines] == pytest.approx([now, now + 1, now + 0.5])
    assert [line.message for line in store.logs("b")] == ["other request"]
    assert store.logs("unknown") == []


# -- output expiry ---------------------------------------------------------------------------------


def test_expired_outputs_are_listed_after_their_lifetime_and_hidden_once_marked(store: JobStore) -> None:
    now = time.time()
    store.submit(new_job("kept", output_ttl_seconds=60.0))
    store.submit(new_job("forever"))
    store.submit(new_job("longer", output_ttl_seconds=600.0))
    assert store.complete("kept", succeeded(("kept/0.png", "kept/1.png")), now) is True
    assert store.complete("forever", succeeded(("forever/0.png",)), now) is True
    assert store.complete("longer", succeeded(("longer/0.png",)), now) is True

    assert store.expired_outputs(now + 59, 100) == []
    expired = store.expired_outputs(now + 61, 100)
    assert [(request_id, list(keys)) for request_id, keys in expired] == [
        ("kept", ["kept/0.png", "kept/1.png"])
    ]
    assert get(store, "kept").output_expired is False

    store.mark_output_expired("kept")
    assert store.expired_outputs(now + 61, 100) == []
    job = get(store, "kept")
    assert job.output_expired is True
    assert job.state is State.COMPLETED
    assert job.outcome is not None and job.outcome.body == {}
    later = store.expired_outputs(now + 601, 100)
    assert [request_id for request_id, _ in later] == ["longer"]
    assert get(store, "forever").output_expired is False


def test_expired_outputs_respects_the_limit(store: JobStore) -> None:
    now = time.time()
    names = [f"j{i}" for i in range(5)]
    for name in names:
        store.submit(new_job(name, output_ttl_seconds=1.0))
        store.complete(name, succeeded((f"{name}/0.png",)), now)
    first = store.expired_outputs(now + 2, 3)
    assert len(first) == 3
    for request_id, _ in first:
        store.mark_output_expired(request_id)
    rest = store.expired_outputs(now + 2, 3)
    assert sorted(request_id for request_id, _ in [*first, *rest]) == names


def finish_with_logs(store: JobStore, name: str, now: float, ttl: float, **fields: Any) -> None:
    store.submit(new_job(name, output_ttl_seconds=ttl, **fields))
    store.append_log(name, "step 1/2", "INFO", now)
    store.complete(name, invalid(), now)


def test_an_expired_request_keeps_only_a_tombstone(store: JobStore) -> None:
    now = time.time()
    finish_with_logs(store, "expired", now, ttl=10.0)
    finish_with_logs(store, "kept", now, ttl=1000.0)
    before = get(store, "expired")
    store.mark_output_expired("expired")
    tombstone = get(store, "expired")
    assert store.logs("expired") == []
    assert tombstone.input == {} and tombstone.outcome is not None and tombstone.outcome.body == {}
    # What status reads is still there: how it ended.
    assert before.outcome is not None
    assert (tombstone.state, tombstone.output_expired) == (State.COMPLETED, True)
    assert (tombstone.outcome.status_code, tombstone.outcome.error, tombstone.outcome.error_type) == (
        before.outcome.status_code,
        before.outcome.error,
        before.outcome.error_type,
    )
    summary = store.summary("expired")
    assert summary is not None and summary.output_expired and summary.error_type == "image_load_error"
    # Nothing of the other request went.
    assert [line.message for line in store.logs("kept")] == ["step 1/2"]
    assert get(store, "kept").input == new_job().input and get(store, "kept").outcome == invalid()


def test_tombstones_are_pruned_after_the_retention_with_their_finished_webhooks(store: JobStore) -> None:
    now = time.time()
    finish_with_logs(store, "early", now, ttl=10.0, webhook_url="https://hooks.example/early")
    finish_with_logs(store, "later", now, ttl=20.0)
    finish_with_logs(store, "not-expired", now, ttl=10.0)  # its outputs were never swept
    finish_with_logs(store, "hook-pending", now, ttl=10.0, webhook_url="https://hooks.example/pending")
    for name in ["early", "later", "hook-pending"]:
        store.mark_output_expired(name)
    (delivered,) = store.webhook_deliveries("early")
    store.webhook_attempted(delivered.delivery_id, True, None, "HTTP 200")

    assert store.prune_records(now + 10.0, 100) == 0  # expired exactly then: not before
    assert store.prune_records(now + 10.5, 100) == 1
    assert store.get("early") is None and store.summary("early") is None
    assert store.webhook_deliveries("early") == []
    # A webhook still to be tried keeps its request's record until it is delivered or given up.
    assert get(store, "hook-pending").output_expired
    (pending,) = store.webhook_deliveries("hook-pending")
    store.webhook_attempted(pending.delivery_id, False, None, "HTTP 500")  # given up
    assert store.prune_records(now + 10.5, 100) == 1
    assert store.get("hook-pending") is None and store.webhook_deliveries("hook-pending") == []
    assert get(store, "later").output_expired
    assert store.prune_records(now + 1000.0, 100) == 1
    assert store.get("later") is None
    assert get(store, "not-expired").outcome == invalid()
    assert [line.message for line in store.logs("not-expired")] == ["step 1/2"]
    assert store.prune_records(now + 1000.0, 100) == 0


def test_prune_records_respects_the_limit(store: JobStore) -> None:
    now = time.time()
    names = [f"j{i}" for i in range(5)]
    for name in names:
        finish_with_logs(store, name, now, ttl=1.0)
        store.mark_output_expired(name)
    assert [store.prune_records(now + 2, 2) for _ in range(4)] == [2, 2, 1, 0]
    assert [store.get(name) for name in names] == [None] * 5


# -- uploads ---------------------------------------------------------------------------------------


def upload(name: str) -> str:
    return f"uploads/{uuid.uuid5(uuid.NAMESPACE_URL, name)}.png"


def test_an_upload_is_its_owners_until_it_expires(store: JobStore) -> None:
    now = time.time()
    store.add_upload(upload("a"), "key-a", now + 10)
    assert store.upload_owner(upload("a"), now) == "key-a"
    assert store.upload_owner(upload("a"), now + 9.9) == "key-a"
    assert store.upload_owner(upload("a"), now + 10) is None  # its time is up, swept or not
    assert store.upload_owner(upload("never"), now) is None
    store.add_upload(upload("a"), "key-b", now + 100)  # a repeat keeps the first record
    assert store.upload_owner(upload("a"), now) == "key-a"
    assert store.expired_uploads(now + 5, 10) == []


def test_expired_uploads_are_listed_longest_expired_first_then_forgotten(store: JobStore) -> None:
    now = time.time()
    for name, lifetime in [("late", 3.0), ("early", 1.0), ("kept", 100.0), ("middle", 2.0)]:
        store.add_upload(upload(name), "key-a", now + lifetime)
    assert store.expired_uploads(now + 3, 2) == [upload("early"), upload("middle")]
    expired = store.expired_uploads(now + 3, 10)
    assert expired == [upload("early"), upload("middle"), upload("late")]  # exactly at its expiry: expired
    store.forget_uploads([*expired[:2], upload("never")])
    store.forget_uploads([])
    assert store.expired_uploads(now + 3, 10) == [upload("late")]
    store.forget_uploads(store.expired_uploads(now + 3, 10))
    assert store.expired_uploads(now + 1000, 10) == [upload("kept")]
    assert store.upload_owner(upload("kept"), now) == "key-a"


def test_uploads_survive_reopening(store_kind: StoreKind) -> None:
    now = time.time()
    first = store_kind.open()
    first.add_upload(upload("kept"), "key-a", now + 60)
    first.close()
    second = store_kind.open()
    try:
        assert second.upload_owner(upload("kept"), now) == "key-a"
    finally:
        second.close()


# -- webhooks --------------------------------------------------------------------------------------


def delivery_of(store: JobStore, request_id: str) -> Any:
    (delivery,) = store.webhook_deliveries(request_id)
    return delivery


def one_delivery(store: JobStore, now: float) -> Any:
    due = store.due_webhooks(now, 10)
    assert len(due) == 1, due
    return delivery_of(store, due[0].request_id)


def finished_with_webhook(store: JobStore, name: str, now: float) -> int:
    store.submit(new_job(name, webhook_url=f"https://hooks.example/{name}"))
    store.complete(name, succeeded(), now)
    return delivery_of(store, name).delivery_id


def test_completing_a_job_queues_exactly_one_webhook_with_the_contract_body(store: JobStore) -> None:
    now = time.time()
    job = new_job("a", webhook_url="https://hooks.example/done", owner="alice")
    store.submit(job)
    claim(store, now)
    outcome = succeeded(("a/0.png",))
    assert store.complete("a", outcome, now, worker_id="worker-a") is True
    assert store.complete("a", outcome, now) is False
    assert store.due_webhooks(now - 1, 10) == []
    delivery = one_delivery(store, now)
    assert (delivery.request_id, delivery.url, delivery.user_id, delivery.attempts, delivery.state) == (
        "a",
        "https://hooks.example/done",
        "alice",
        0,
        "pending",
    )
    assert json.loads(delivery.body) == {
        "request_id": "a",
        "gateway_request_id": job.gateway_request_id,
        "status": "OK",
        "payload": outcome.body,
    }


def test_a_failed_job_queues_an_error_webhook(store: JobStore) -> None:
    now = time.time()
    job = new_job("a", webhook_url="https://hooks.example/done")
    store.submit(job)
    claim(store, now)
    outcome = invalid()
    assert store.complete("a", outcome, now, worker_id="worker-a") is True
    assert json.loads(one_delivery(store, now).body) == {
        "request_id": "a",
        "gateway_request_id": job.gateway_request_id,
        "status": "ERROR",
        "error": "Invalid status code: 422",
        "payload": outcome.body,
    }


def test_cancelled_and_timed_out_jobs_queue_their_webhooks(store: JobStore) -> None:
    now = time.time()
    store.submit(new_job("cancelled", webhook_url="https://hooks.example/c"))
    store.submit(new_job("late", webhook_url="https://hooks.example/t", start_deadline=now - 1))
    store.submit(new_job("quiet"))
    assert store.cancel("cancelled", "alice", now) is CancelResult.CANCELLED
    assert store.expire_unstarted(now) == 1
    store.complete("quiet", succeeded(), now)
    assert {due.request_id for due in store.due_webhooks(now, 10)} == {"cancelled", "late"}
    assert store.webhook_deliveries("quiet") == []
    bodies = {name: json.loads(delivery_of(store, name).body) for name in ["cancelled", "late"]}
    assert bodies["cancelled"]["status"] == "ERROR"
    assert bodies["cancelled"]["error"] == "Invalid status code: 400"
    assert bodies["cancelled"]["payload"]["error_type"] == "client_cancelled"
    assert bodies["late"]["error"] == "Invalid status code: 504"
    assert bodies["late"]["payload"] == {"detail": "Request timed out", "error_type": "request_timeout"}


def test_webhook_delivery_states(store: JobStore) -> None:
    now = time.time()
    ids = {name: finished_with_webhook(store, name, now) for name in ["delivered", "retried", "given-up"]}
    for delivery_id in ids.values():
        assert store.start_webhook(delivery_id, now, now + 50) is not None

    store.webhook_attempted(ids["delivered"], True, None, "HTTP 200")
    store.webhook_attempted(ids["retried"], False, now + 30, "HTTP 500")
    store.webhook_attempted(ids["given-up"], False, None, "HTTP 500")
    assert [(d.state, d.attempts) for d in store.webhook_deliveries("delivered")] == [("delivered", 1)]
    assert [(d.state, d.attempts, d.last_error) for d in store.webhook_deliveries("given-up")] == [
        ("failed", 1, "HTTP 500")
    ]
    assert store.due_webhooks(now + 29, 10) == []
    retry = one_delivery(store, now + 30)
    assert (retry.request_id, retry.attempts, retry.state) == ("retried", 1, "pending")
    assert retry.last_error == "HTTP 500"

    started = store.start_webhook(retry.delivery_id, now + 30, now + 80)
    assert started is not None and started.body == retry.body and started.state == "sending"
    store.webhook_attempted(retry.delivery_id, False, now + 90, "connection refused")
    assert store.due_webhooks(now + 89, 10) == []
    retry = one_delivery(store, now + 90)
    assert retry.attempts == 2 and retry.last_error == "connection refused"
    store.start_webhook(retry.delivery_id, now + 90, now + 140)
    store.webhook_attempted(retry.delivery_id, True, None, "HTTP 204")
    assert store.due_webhooks(now + 10_000, 10) == []
    assert delivery_of(store, "retried").state == "delivered"


def test_a_webhook_in_flight_is_not_due_until_its_deadline_lapses(store: JobStore) -> None:
    now = time.time()
    delivery_id = finished_with_webhook(store, "a", now)
    started = store.start_webhook(delivery_id, now, now + 50)
    assert started is not None and (started.request_id, started.attempts) == ("a", 0)
    assert store.due_webhooks(now + 49, 10) == []
    assert store.start_webhook(delivery_id, now + 49, now + 99) is None  # in flight: nobody else takes it
    assert delivery_of(store, "a").state == "sending"

    # The sender died mid-send: once the deadline lapses the delivery is due again, the lost try uncounted.
    assert [due.delivery_id for due in store.due_webhooks(now + 50, 10)] == [delivery_id]
    again = store.start_webhook(delivery_id, now + 50, now + 100)
    assert again is not None and again.attempts == 0 and again.body == started.body


def test_a_webhook_that_ended_is_never_started_or_counted_again(store: JobStore) -> None:
    now = time.time()
    delivered = finished_with_webhook(store, "delivered", now)
    failed = finished_with_webhook(store, "failed", now)
    for delivery_id in (delivered, failed):
        store.start_webhook(delivery_id, now, now + 50)
    store.webhook_attempted(delivered, True, None, "HTTP 200")
    store.webhook_attempted(failed, False, None, "HTTP 500")
    for delivery_id in (delivered, failed):
        assert store.start_webhook(delivery_id, now + 10_000, now + 10_050) is None
        store.webhook_attempted(delivery_id, False, now + 5, "late report")  # a stray report: no change
    assert store.release_webhooks(now + 10_000) == 0
    done, gave_up = delivery_of(store, "delivered"), delivery_of(store, "failed")
    assert (done.state, done.attempts) == ("delivered", 1)
    assert (gave_up.state, gave_up.attempts, gave_up.last_error) == ("failed", 1, "HTTP 500")
    assert store.due_webhooks(now + 10_000, 10) == []


def webhooks_in_flight(store: JobStore, now: float) -> dict[str, int]:
    """Deliveries a, b and c in flight until now + 50; "waiting" tried once, next try at now + 30."""
    ids = {name: finished_with_webhook(store, name, now) for name in ["a", "b", "c", "waiting"]}
    for name in ["a", "b", "c"]:
        store.start_webhook(ids[name], now, now + 50)
    store.start_webhook(ids["waiting"], now, now + 50)
    store.webhook_attempted(ids["waiting"], False, now + 30, "HTTP 500")
    return ids


def test_release_webhooks_makes_tries_cut_short_due_now_without_counting_them(store: JobStore) -> None:
    now = time.time()
    ids = webhooks_in_flight(store, now)

    # Named (a shutdown stopped these): only those, and only while in flight.
    assert store.release_webhooks(now + 1, [ids["a"], ids["waiting"]]) == 1
    assert [due.request_id for due in store.due_webhooks(now + 1, 10)] == ["a"]
    assert (delivery_of(store, "a").state, delivery_of(store, "a").attempts) == ("pending", 0)
    assert delivery_of(store, "waiting").state == "pending"
    assert store.due_webhooks(now + 29, 10) == store.due_webhooks(now + 1, 10)  # its retry time is kept
    assert store.release_webhooks(now + 1, []) == 0


def test_release_webhooks_without_ids_releases_every_try_in_flight(sqlite_store: SQLiteJobStore) -> None:
    """At start-up, for a store only this process uses: every delivery in flight was the dead process's.
    (A shared store releases nothing so: tests/test_postgres_store.py.)"""
    now = time.time()
    ids = webhooks_in_flight(sqlite_store, now)
    assert sqlite_store.release_webhooks(now + 1, [ids["a"]]) == 1
    assert sqlite_store.release_webhooks(now + 2) == 2  # whatever their deadline
    assert [due.request_id for due in sqlite_store.due_webhooks(now + 2, 10)] == ["a", "b", "c"]
    assert all(delivery_of(sqlite_store, name).attempts == 0 for name in ["a", "b", "c"])
    assert sqlite_store.release_webhooks(now + 3) == 0


def test_a_webhook_in_flight_when_the_store_closed_is_released_on_reopening(sqlite_path: Path) -> None:
    now = time.time()
    store = SQLiteJobStore(sqlite_path)
    delivery_id = finished_with_webhook(store, "a", now)
    store.start_webhook(delivery_id, now, now + 50)
    store.close()  # the process died mid-send

    reopened = SQLiteJobStore(sqlite_path)
    try:
        assert delivery_of(reopened, "a").state == "sending"
        assert reopened.due_webhooks(now + 1, 10) == []
        assert reopened.release_webhooks(now + 1) == 1
        assert [due.delivery_id for due in reopened.due_webhooks(now + 1, 10)] == [delivery_id]
    finally:
        reopened.close()


def test_due_webhooks_respects_the_limit_oldest_first_and_pages_on(store: JobStore) -> None:
    now = time.time()
    for index in range(5):
        name = f"j{index}"
        store.submit(new_job(name, webhook_url="https://hooks.example/x"))
        store.complete(name, succeeded(), now + index % 3)  # j0 j3, j1 j4, j2: ties broken by age
    first = store.due_webhooks(now + 10, 2)
    assert [due.request_id for due in first] == ["j0", "j3"]
    assert all(due.url == "https://hooks.example/x" for due in first)
    second = store.due_webhooks(now + 10, 2, after=first[-1])
    assert [due.request_id for due in second] == ["j1", "j4"]
    assert [due.request_id for due in store.due_webhooks(now + 10, 2, after=second[-1])] == ["j2"]
    assert store.due_webhooks(now + 10, 2, after=store.due_webhooks(now + 10, 5)[-1]) == []
    # Due means due: an in-flight one whose deadline lapsed counts, one still in flight does not.
    store.start_webhook(first[0].delivery_id, now + 10, now + 20)
    store.start_webhook(first[1].delivery_id, now + 10, now + 100)
    assert [due.request_id for due in store.due_webhooks(now + 20, 10)] == ["j1", "j4", "j2", "j0"]


def test_a_webhook_database_from_before_in_flight_marks_keeps_its_deliveries(sqlite_path: Path) -> None:
    import sqlite3

    # The first release's table and index, with a delivery waiting for its retry.
    connection = sqlite3.connect(sqlite_path)
    connection.executescript(
        """
        CREATE TABLE webhook_deliveries (
            delivery_id INTEGER PRIMARY KEY AUTOINCREMENT,
            request_id TEXT NOT NULL, url TEXT NOT NULL, user_id TEXT NOT NULL, body BLOB NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL, state TEXT NOT NULL DEFAULT 'pending',
            last_error TEXT
        );
        CREATE INDEX webhook_due ON webhook_deliveries(next_attempt_at) WHERE state = 'pending';
        INSERT INTO webhook_deliveries (request_id, url, user_id, body, attempts, next_attempt_at, last_error)
            VALUES ('old', 'https://hooks.example/old', 'alice', X'7B7D', 2, 100.0, 'HTTP 500');
        """
    )
    connection.close()
    store = SQLiteJobStore(sqlite_path)
    try:
        (due,) = store.due_webhooks(100.0, 10)
        started = store.start_webhook(due.delivery_id, 100.0, 150.0)
        assert started is not None
        assert (started.request_id, started.attempts, started.body) == ("old", 2, b"{}")
        store.webhook_attempted(due.delivery_id, True, None, "HTTP 200")
        assert delivery_of(store, "old").state == "delivered"
    finally:
        store.close()


# -- ownership and reopening ------------------------------------------------------------------------


def test_get_hides_other_owners_jobs(store: JobStore) -> None:
    store.submit(new_job("a", owner="alice"))
    assert store.get("a", owner="bob") is None
    job = store.get("a", owner="alice")
    assert job is not None and job.owner == "alice"
    assert store.get("a") is not None
    assert store.get("unknown") is None
    assert store.get("unknown", owner="alice") is None


def test_data_survives_closing_and_reopening(store_kind: StoreKind) -> None:
    now = time.time()
    first = store_kind.open()
    submit_all(first, ["a", "b", "c"])
    claim(first, now)
    first.append_log("a", "step 1/2", "INFO", now)
    first.close()
    second = store_kind.open()
    assert positions(second, ["a", "b", "c"]) == [None, 0, 1]
    assert get(second, "a").state is State.IN_PROGRESS
    assert [line.message for line in second.logs("a")] == ["step 1/2"]
    assert second.submit(new_job("d")) == 2


# -- coordination between processes (the embedded store has nobody to coordinate with) -------------


def test_a_secret_is_made_once_and_kept(store_kind: StoreKind) -> None:
    made: list[bytes] = []

    def make() -> bytes:
        made.append(os.urandom(32))
        return made[-1]

    first = store_kind.open()
    key = first.secret("webhook-signing", make)
    assert first.secret("webhook-signing", make) == key and made == [key]
    assert first.secret("other", lambda: b"other") == b"other"
    first.close()
    assert store_kind.open().secret("webhook-signing", lambda: pytest.fail("made again")) == key


def test_a_free_turn_is_taken_and_listening_can_be_stopped(store: JobStore) -> None:
    task = f"sweep-{uuid.uuid4()}"  # PostgreSQL's advisory locks span the database: not one another run holds
    with store.turn(task) as mine:
        assert mine is True
    with store.turn(task) as again:
        assert again is True
    stop = store.listen(lambda request_id: None, lambda lane: None)
    stop()
    stop()  # stopping twice is harmless


def test_the_embedded_store_is_not_shared_and_notifies_nobody(sqlite_store: SQLiteJobStore) -> None:
    """Its one process wakes its own waiters; and nobody else can hold a turn."""
    assert sqlite_store.shared is False
    heard: list[str] = []
    stop = sqlite_store.listen(heard.append, heard.append)
    sqlite_store.submit(new_job("a"))
    sqlite_store.append_log("a", "hello", "INFO", time.time())
    with sqlite_store.turn("sweep") as mine, sqlite_store.turn("sweep") as again:
        assert mine is True and again is True
    stop()
    assert heard == []


# -- the embedded store's extras -------------------------------------------------------------------


def test_a_second_store_on_the_same_file_is_refused_while_the_first_is_open(sqlite_path: Path) -> None:
    first = SQLiteJobStore(sqlite_path)
    try:
        first.submit(new_job("a"))
        with pytest.raises(DataDirInUse):
            SQLiteJobStore(sqlite_path)
        assert first.queue_position("a") == 0  # the refused attempt did not disturb the owner
    finally:
        first.close()
    second = SQLiteJobStore(sqlite_path)
    try:
        assert second.queue_position("a") == 0
        assert get(second, "a").state is State.IN_QUEUE
    finally:
        second.close()


def _died(store: SQLiteJobStore, request_id: str, times: int, now: float) -> None:
    """Claim `request_id` and let its worker die `times` times, re-queued by the lease sweep each time."""
    for _ in range(times):
        job = store.claim("worker-old", 1.0, now)
        assert job is not None and job.request_id == request_id
        assert store.recover_abandoned(now + 2) == 1


def test_recover_after_restart(sqlite_path: Path) -> None:
    now = time.time()
    before = SQLiteJobStore(sqlite_path)
    before.submit(new_job("unlucky"))
    _died(before, "unlucky", MAX_FAILURES - 1, now)  # one lapsed lease short of being failed
    before.submit(new_job("interrupted"))
    before.submit(new_job("no-retry", no_retry=True))
    before.submit(new_job("cancel-me"))
    before.submit(new_job("queued-normal"))
    before.submit(new_job("queued-low", priority=Priority.LOW))
    running = [before.claim("worker-old", 3600.0, now) for _ in range(4)]  # leases far from lapsing
    assert [job.request_id for job in running if job] == ["unlucky", "interrupted", "no-retry", "cancel-me"]
    assert before.cancel("cancel-me", "alice", now) is CancelResult.REQUESTED
    before.close()  # the process died: nothing else happens to the running jobs

    after = SQLiteJobStore(sqlite_path)
    try:
        assert after.recover_after_restart(now + 5) == 4
        interrupted = get(after, "interrupted")
        assert interrupted.state is State.IN_QUEUE
        assert interrupted.priority is Priority.RETRY
        assert interrupted.started_at is None
        assert counts(interrupted) == (0, 1, 0)
        assert positions(after, ["unlucky", "interrupted", "queued-normal", "queued-low"]) == [0, 1, 2, 3]
        warnings = [line for line in after.logs("interrupted") if line.level == "WARN"]
        assert [line.message for line in warnings] == [WARN_RESTARTED]
        assert warnings[0].timestamp == pytest.approx(now + 5)

        # The crash was not its fault: a request one lapse short of the limit runs again.
        unlucky = get(after, "unlucky")
        assert unlucky.state is State.IN_QUEUE
        assert counts(unlucky) == (MAX_FAILURES - 1, 1, 0)
        assert [line.message for line in after.logs("unlucky")] == [WARN_REQUEUED] * (MAX_FAILURES - 1) + [
            WARN_RESTARTED
        ]

        no_retry = get(after, "no-retry")
        assert no_retry.state is State.COMPLETED
        assert no_retry.outcome is not None
        assert (no_retry.outcome.status_code, no_retry.outcome.error_type) == (500, "internal_server_error")
        assert no_retry.outcome.body["error_type"] == "internal_server_error"
        assert "x-fal-no-retry" in (no_retry.outcome.error or "")

        cancelled = get(after, "cancel-me")
        assert cancelled.state is State.COMPLETED
        assert cancelled.outcome is not None and cancelled.outcome.error_type == "client_cancelled"
        assert after.logs("no-retry") == [] and after.logs("cancel-me") == []

        assert after.recover_after_restart(now + 6) == 0
        job = after.claim("worker-new", LEASE, now + 7)
        # Started MAX_FAILURES - 1 times before, once when the server died, and now.
        assert job is not None and job.request_id == "unlucky" and job.attempts == MAX_FAILURES + 1
        assert claimed_ids(after, now + 7) == ["interrupted", "queued-normal", "queued-low"]
    finally:
        after.close()


def test_a_request_the_server_keeps_dying_under_ends_with_a_clear_error(sqlite_path: Path) -> None:
    """A request that kills the server each time it runs must not loop for ever: MAX_INTERRUPTIONS ends it."""
    now = time.time()
    store = SQLiteJobStore(sqlite_path)
    store.submit(new_job("poison"))
    store.submit(new_job("next"))
    try:
        for crash in range(1, MAX_INTERRUPTIONS + 1):
            job = store.claim("worker-old", 3600.0, now + crash)
            assert job is not None and job.request_id == "poison"
            store.close()
            store = SQLiteJobStore(sqlite_path)
            assert store.recover_after_restart(now + crash) == 1
            job = get(store, "poison")
            assert counts(job) == (0, crash, 0)
            # Exactly MAX_INTERRUPTIONS end it: one fewer re-queues it.
            assert job.state is (State.COMPLETED if crash == MAX_INTERRUPTIONS else State.IN_QUEUE), crash
        assert job.outcome is not None
        assert (job.outcome.status_code, job.outcome.error_type) == (500, "internal_server_error")
        assert job.outcome.error == (
            f"The server stopped {MAX_INTERRUPTIONS} times while this request ran; it is not run again"
        )
        assert [line.message for line in store.logs("poison")] == [WARN_RESTARTED] * (MAX_INTERRUPTIONS - 1)
        assert claimed_ids(store, now + 100) == ["next"]
    finally:
        store.close()


def test_queue_position_reads_one_consistent_snapshot(sqlite_store: SQLiteJobStore) -> None:
    """Writers commit while a status read is half-way through: the answer must still be one that was true."""
    now = time.time()
    names = ["n0", "n1", "n2", "n3"]
    submit_all(sqlite_store, names)
    assert sqlite_store.cancel("n1", "alice", now) is CancelResult.CANCELLED
    assert sqlite_store.queue_position("n3") == 2
    head = SQLiteJobStore._head
    interfered: list[bool] = []

    def head_then_interfere(connection: Any, lane: str, priority: int) -> int | None:
        found = head(connection, lane, priority)
        if not interfered:
            interfered.append(True)
            # Another thread claims the head and sweeps (pruning the holes behind the new head).
            other = threading.Thread(
                target=lambda: (claim(sqlite_store, now), sqlite_store.expire_unstarted(now))
            )
            other.start()
            other.join()
        return found

    with mock.patch.object(sqlite_store, "_head", head_then_interfere):
        assert sqlite_store.queue_position("n3") in (2, 1)  # before or after the claim, nothing else
    assert interfered
    assert sqlite_store.queue_position("n3") == 1


def database_handles(path: Path) -> list[str]:
    """This process's open file descriptors on the database and its -wal and -shm companions."""
    handles = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # an fd closed while we looked
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(path)):
                handles.append(target)
    return handles


# Each connection holds the database and its -wal file; the -shm file is shared by the process.
MAX_HANDLES = 2 * POOL_SIZE + 1


def test_database_handles_stay_bounded_whatever_the_threads(
    sqlite_store: SQLiteJobStore, sqlite_path: Path
) -> None:
    """Rounds of short-lived threads (as the API's threadpool retires and starts them): connections are
    the pool's, not the threads', so their number stays at most POOL_SIZE and does not grow."""

    def burst(threads: int) -> None:
        start = threading.Barrier(threads)

        def one_request() -> None:
            start.wait()
            name = str(uuid.uuid4())
            sqlite_store.submit(new_job(name))
            assert sqlite_store.queue_position(name) is not None
            assert get(sqlite_store, name).state is State.IN_QUEUE
            sqlite_store.append_log(name, "hello", "INFO", time.time())

        running = [threading.Thread(target=one_request) for _ in range(threads)]
        for thread in running:
            thread.start()
        for thread in running:
            thread.join()

    after_each = []
    for _ in range(4):
        burst(3 * POOL_SIZE)
        assert sqlite_store.open_connections() <= POOL_SIZE
        after_each.append(len(database_handles(sqlite_path)))
    assert max(after_each) <= MAX_HANDLES, after_each  # 96 threads came and went


def test_the_pool_lends_at_most_its_size_at_once_and_every_borrower_is_served(
    sqlite_store: SQLiteJobStore,
) -> None:
    held, most = [0], [0]
    lock = threading.Lock()
    full = threading.Event()

    def borrow() -> None:
        with sqlite_store._read():
            with lock:
                held[0] += 1
                most[0] = max(most[0], held[0])
                if held[0] == POOL_SIZE:
                    full.set()
            full.wait(10)  # hold on until the pool is exhausted once, so later borrowers must queue
            with lock:
                held[0] -= 1

    borrowers = [threading.Thread(target=borrow) for _ in range(3 * POOL_SIZE)]
    for thread in borrowers:
        thread.start()
    for thread in borrowers:
        thread.join(20)
    assert not any(thread.is_alive() for thread in borrowers)
    assert full.is_set() and most[0] == POOL_SIZE
    assert sqlite_store.open_connections() == POOL_SIZE


def test_a_write_that_waits_too_long_is_refused_as_unavailable_with_nothing_changed(
    sqlite_store: SQLiteJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("kontextd.jobs.sqlite.WAIT_SECONDS", 0.2)
    sqlite_store.submit(new_job("a"))
    holding, release = threading.Event(), threading.Event()

    def hold_the_write_turn() -> None:
        with sqlite_store._write():
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold_the_write_turn)
    holder.start()
    try:
        assert holding.wait(10)
        with pytest.raises(StoreUnavailable, match="busy"):
            sqlite_store.submit(new_job("b"))
        assert sqlite_store.get("b") is None
        assert sqlite_store.queue_position("a") == 0  # reads go on meanwhile
    finally:
        release.set()
        holder.join()
    assert sqlite_store.submit(new_job("b")) == 1


# The first release's schema: what a database made by it holds before this release opens it.
FIRST_RELEASE_SCHEMA = """
CREATE TABLE jobs (
    request_id TEXT PRIMARY KEY, gateway_request_id TEXT NOT NULL, app_id TEXT NOT NULL, owner TEXT NOT NULL,
    lane TEXT NOT NULL, input_json TEXT NOT NULL, state TEXT NOT NULL, priority INTEGER NOT NULL,
    ticket INTEGER NOT NULL, created_at REAL NOT NULL, started_at REAL, completed_at REAL,
    start_deadline REAL, cancel_requested INTEGER NOT NULL DEFAULT 0, no_retry INTEGER NOT NULL DEFAULT 0,
    worker_id TEXT, lease_expires_at REAL, attempts INTEGER NOT NULL DEFAULT 0, webhook_url TEXT,
    output_ttl REAL, outcome_json TEXT, result_json TEXT, expires_at REAL,
    output_expired INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_queue ON jobs(lane, priority, ticket) WHERE state = 'IN_QUEUE';
CREATE INDEX jobs_deadline ON jobs(start_deadline) WHERE state = 'IN_QUEUE' AND start_deadline IS NOT NULL;
CREATE INDEX jobs_running ON jobs(lease_expires_at) WHERE state = 'IN_PROGRESS';
CREATE INDEX jobs_expiry ON jobs(expires_at) WHERE output_expired = 0 AND expires_at IS NOT NULL;
CREATE TABLE queue_tickets (
    lane TEXT NOT NULL, priority INTEGER NOT NULL, next_ticket INTEGER NOT NULL, PRIMARY KEY (lane, priority)
) WITHOUT ROWID;
CREATE TABLE queue_holes (
    lane TEXT NOT NULL, priority INTEGER NOT NULL, ticket INTEGER NOT NULL,
    PRIMARY KEY (lane, priority, ticket)
) WITHOUT ROWID;
CREATE TABLE job_logs (
    request_id TEXT NOT NULL, seq INTEGER PRIMARY KEY AUTOINCREMENT,
    timestamp REAL NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL
);
CREATE INDEX job_logs_request ON job_logs(request_id, seq);
CREATE TABLE webhook_deliveries (
    delivery_id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL, url TEXT NOT NULL, user_id TEXT NOT NULL, body BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL, state TEXT NOT NULL DEFAULT 'pending',
    last_error TEXT
);
CREATE INDEX webhook_due ON webhook_deliveries(next_attempt_at) WHERE state = 'pending';
-- A request that ran (ticket 0, claimed: a hole) when that release was killed, and one queued behind it.
INSERT INTO queue_tickets VALUES ('local', 1, 2);
INSERT INTO queue_holes VALUES ('local', 1, 0);
INSERT INTO jobs (request_id, gateway_request_id, app_id, owner, lane, input_json, state, priority, ticket,
                  created_at, started_at, worker_id, lease_expires_at, attempts)
    VALUES ('running', 'g-1', 'fal-ai/flux-kontext/dev', 'alice', 'local', '{"prompt": "a cat"}',
            'IN_PROGRESS', 1, 0, 1.0, 2.0, 'old-worker', 9e9, 2);
INSERT INTO jobs (request_id, gateway_request_id, app_id, owner, lane, input_json, state, priority, ticket,
                  created_at)
    VALUES ('queued', 'g-2', 'fal-ai/flux-kontext/dev', 'alice', 'local', '{"prompt": "a dog"}',
            'IN_QUEUE', 1, 1, 1.5);
INSERT INTO job_logs (request_id, timestamp, level, message) VALUES ('running', 2.0, 'INFO', 'step 1/2');
"""


def test_a_database_made_by_the_first_release_keeps_working(sqlite_path: Path) -> None:
    with contextlib.closing(sqlite3.connect(sqlite_path)) as connection:
        connection.executescript(FIRST_RELEASE_SCHEMA)
    now = time.time()
    for opening in range(2):  # the migration is idempotent: a second opening changes nothing
        store = SQLiteJobStore(sqlite_path)
        try:
            if opening == 0:
                assert positions(store, ["running", "queued"]) == [None, 0]
                assert store.recover_after_restart(now) == 1
                running = get(store, "running")
                # Its attempts under the old release count as starts, not as failures.
                assert (running.attempts, *counts(running)) == (2, 0, 1, 0)
                assert positions(store, ["running", "queued"]) == [0, 1]
                assert store.submit(new_job("new")) == 2
                assert claimed_ids(store, now) == ["running", "queued", "new"]
                assert store.complete("queued", succeeded(), now, worker_id="worker-a") is True
                store.append_log("running", "step 1/2", "INFO", now)
                store.add_upload(upload("on-an-old-database"), "key-a", now + 60)  # its table is made too
            else:
                assert store.upload_owner(upload("on-an-old-database"), now) == "key-a"
                assert get(store, "queued").outcome == succeeded()
                assert [line.message for line in store.logs("running")] == [
                    "step 1/2",
                    WARN_RESTARTED,
                    "step 1/2",
                ]
                assert store.recover_after_restart(now) == 2
        finally:
            store.close()
    with contextlib.closing(sqlite3.connect(sqlite_path)) as connection:
        names = [row[1] for row in connection.execute("PRAGMA table_info(jobs)")]
    assert len(names) == len(set(names))
    assert {"failures", "interruptions", "storage_failures"} <= set(names)


def test_summary_carries_what_status_needs_without_the_bodies(store: JobStore) -> None:
    now = time.time()
    store.submit(new_job("a"))
    queued = store.summary("a")
    assert queued is not None and queued.state is State.IN_QUEUE and queued.error is None
    assert store.summary("a", owner="someone-else") is None
    assert store.summary("unknown") is None
    claim(store, now)
    store.complete("a", invalid(), now + 1, worker_id="worker-a")
    ended = store.summary("a")
    full = get(store, "a")
    assert ended is not None and full.outcome is not None
    assert (ended.state, ended.error, ended.error_type, ended.metrics) == (
        State.COMPLETED,
        full.outcome.error,
        full.outcome.error_type,
        full.outcome.metrics,
    )
    assert ended.app_id == full.app_id and ended.output_expired is False


# -- poll: the one awaitable read of a status poll --------------------------------------------------


async def _poll_everything(store: JobStore, names: list[str], owners: list[str | None]) -> list[Any]:
    seen = []
    for name in names:
        for owner in owners:
            for with_logs in (False, True):
                seen.append((name, owner, with_logs, await store.poll(name, owner, with_logs)))
    return seen


def _expected_polls(store: JobStore, names: list[str], owners: list[str | None]) -> list[Any]:
    expected = []
    for name in names:
        for owner in owners:
            for with_logs in (False, True):
                summary = store.summary(name, owner)
                polled = None
                if summary is not None:
                    position = store.queue_position(name)
                    polled = Polled(summary, position, store.logs(name) if with_logs else None)
                expected.append((name, owner, with_logs, polled))
    return expected


@pytest.mark.parametrize("serving", [True, False], ids=["serving", "outside-serving"])
def test_poll_reads_what_summary_position_and_logs_read(store: JobStore, serving: bool) -> None:
    """Queued at the head, in the middle and behind another level (position 0 included), running,
    ended with an error, someone else's, unknown; with and without logs (none yet: an empty list)."""
    now = time.time()
    store.submit(new_job("running"))
    store.submit(new_job("ended"))
    assert claim(store, now) is not None and claim(store, now) is not None
    store.complete("ended", invalid(), now + 1, worker_id="worker-a")
    for name, priority in [("low", Priority.LOW), ("first", Priority.NORMAL), ("second", Priority.NORMAL)]:
        store.submit(new_job(name, priority=priority))
    store.submit(new_job("bob's", owner="bob"))
    store.append_log("running", "step 1", "INFO", now)
    store.append_log("running", "step 2", "WARN", now + 0.5)
    store.append_log("second", "queued", "INFO", now)
    names = ["running", "ended", "low", "first", "second", "bob's", "unknown"]
    owners: list[str | None] = [None, "alice", "bob"]

    async def run() -> list[Any]:
        if not serving:
            return await _poll_everything(store, names, owners)
        async with store.serving():
            return await _poll_everything(store, names, owners)

    seen = asyncio.run(run())
    assert seen == _expected_polls(store, names, owners)
    by_key = {(name, owner, logs): polled for name, owner, logs, polled in seen}
    assert [by_key[(name, None, False)].queue_position for name in ["first", "second", "low", "bob's"]] == [
        0,
        1,
        3,
        2,
    ]
    assert by_key[("first", None, True)].logs == []
    assert by_key[("ended", "bob", False)] is None and by_key[("unknown", None, True)] is None
    assert by_key[("running", "alice", False)].queue_position is None


def test_a_poll_sees_each_write_made_through_the_store_at_once(store: JobStore) -> None:
    """Every request polled first (so a poll cache holds it, kontextd/jobs/poll_cache.py; listening, for
    a shared store's), then changed, then polled again at once: the change is there, the positions of
    those behind included."""
    now = time.time()
    stop = store.listen(lambda request_id: None, lambda lane: None)

    async def scenario() -> None:
        async def poll(name: str, with_logs: bool = False) -> Polled:
            found = await store.poll(name, None, with_logs)
            assert found is not None, name
            return found

        store.submit(new_job("head"))
        store.submit(new_job("behind"))
        twice = ["head", "behind"] * 2
        assert [(await poll(name)).queue_position for name in twice] == [0, 1, 0, 1]
        assert claim(store, now) is not None
        assert (await poll("behind")).queue_position == 0 and (await poll("head")).queue_position is None
        store.submit(new_job("first", priority=Priority.RETRY))  # joins ahead of it
        assert (await poll("behind")).queue_position == 1
        assert (await poll("head", with_logs=True)).logs == []
        store.append_log("head", "step 1/2", "INFO", now)
        assert [line.message for line in (await poll("head", with_logs=True)).logs or []] == ["step 1/2"]
        assert (await poll("head")).summary.state == State.IN_PROGRESS
        assert store.complete("head", succeeded(), now + 1, worker_id="worker-a") is True
        assert (await poll("head")).summary.state == State.COMPLETED
        assert store.cancel("behind", "alice", now) is CancelResult.CANCELLED
        assert (await poll("behind")).summary.error_type is not None

    async def run() -> None:
        async with store.serving():
            await scenario()

    try:
        asyncio.run(run())
    finally:
        stop()


def test_sqlite_a_commit_drops_only_the_polls_of_what_it_changed(
    sqlite_store: SQLiteJobStore, sqlite_path: Path
) -> None:
    """Leases, checkpoints and webhook tries change nothing a poll reads: they leave kept polls alone (a
    status poll of a long request stays cheap while its heartbeat beats); a log line drops its own request's
    only. A write behind the store's back shows which polls were answered from memory."""
    now = time.time()
    submit_all(sqlite_store, ["a", "b"])
    assert claim(sqlite_store, now) is not None and claim(sqlite_store, now) is not None

    def poll(name: str) -> Polled:
        found = asyncio.run(sqlite_store.poll(name, None, False))
        assert found is not None, name
        return found

    assert poll("a").summary.app_id == poll("b").summary.app_id == APP_ID  # both kept now
    with contextlib.closing(sqlite3.connect(sqlite_path)) as behind_its_back, behind_its_back:
        behind_its_back.execute("UPDATE jobs SET app_id = 'probe'")
    assert sqlite_store.renew_lease("a", "worker-a", LEASE, now + 1)
    assert sqlite_store.checkpoint("a", "worker-a", "task 1", "handle")
    assert sqlite_store.release_webhooks(now) == 0
    assert poll("a").summary.app_id == poll("b").summary.app_id == APP_ID  # still from memory
    sqlite_store.append_log("b", "step 1/2", "INFO", now)
    assert (poll("a").summary.app_id, poll("b").summary.app_id) == (APP_ID, "probe")


def test_ping_answers_on_a_working_store(store: JobStore) -> None:
    async def run() -> None:
        await store.ping()  # outside serving()
        async with store.serving():
            await store.ping()

    asyncio.run(run())


# -- usage ------------------------------------------------------------------------------------------------


def used(owner: str, app_id: str, day: str, images: int = 1, seconds: float = 2.0) -> Usage:
    return Usage(owner, app_id, day, 1, images, images * 1.048576, seconds)


def test_usage_adds_up_per_key_endpoint_and_day(store: JobStore) -> None:
    store.add_usage(used("alice", "app/a", "2026-12-01", images=2))
    store.add_usage(
        used("alice", "app/a", "2026-12-01", images=1, seconds=0.0)
    )  # an upstream request: no GPU
    store.add_usage(used("alice", "app/b", "2026-12-01"))
    store.add_usage(used("bob", "app/a", "2026-12-02"))
    store.add_usage(used("alice", "app/a", "2026-12-03"))
    assert store.usage("2026-12-01", "2026-12-02") == [  # both days included, ordered day, key, endpoint
        Usage("alice", "app/a", "2026-12-01", 2, 3, pytest.approx(3 * 1.048576), 2.0),
        Usage("alice", "app/b", "2026-12-01", 1, 1, pytest.approx(1.048576), 2.0),
        Usage("bob", "app/a", "2026-12-02", 1, 1, pytest.approx(1.048576), 2.0),
    ]
    assert [u.day for u in store.usage("2026-12-02", "2026-12-03", owner="alice")] == ["2026-12-03"]
    assert store.usage("2026-12-04", "2026-12-31") == []


def test_concurrent_usage_adds_are_all_counted(store: JobStore) -> None:
    threads = [
        threading.Thread(
            target=lambda: [store.add_usage(used("alice", "app/a", "2026-12-01")) for _ in range(10)]
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (total,) = store.usage("2026-12-01", "2026-12-01")
    assert (total.requests, total.images, total.gpu_seconds) == (40, 40, pytest.approx(80.0))


# -- previews ---------------------------------------------------------------------------------------------


def test_a_running_jobs_preview_is_kept_for_it_alone_until_it_ends(store: JobStore) -> None:
    now = time.time()
    store.submit(new_job("a"))
    assert store.preview("a") is None  # queued: none
    assert store.set_preview("a", "worker-a", "data:image/jpeg;base64,AA") is False  # not running yet
    claim(store, now, "worker-a")
    assert store.set_preview("a", "worker-b", "data:image/jpeg;base64,BB") is False  # not its worker
    assert store.set_preview("a", "worker-a", "data:image/jpeg;base64,CC") is True
    assert store.preview("a") == "data:image/jpeg;base64,CC"
    assert store.set_preview("a", "worker-a", "data:image/jpeg;base64,DD") is True
    assert store.preview("a") == "data:image/jpeg;base64,DD"  # the latest only
    assert store.release("a", "worker-a", Release.SHUTDOWN, now) is State.IN_QUEUE
    claim(store, now, "worker-b")
    assert store.preview("a") is None  # a new run starts without the last one's
    store.set_preview("a", "worker-b", "data:image/jpeg;base64,EE")
    store.complete("a", outcomes.succeeded({"images": []}, 1.0, (), "tiny"), now, worker_id="worker-b")
    assert store.preview("a") is None
    assert store.preview("unknown") is None
