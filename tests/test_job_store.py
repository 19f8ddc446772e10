"""The job store's behaviour, written against the JobStore protocol.

Every test that only uses the protocol runs once per store kind in STORES; a PostgreSQL store joins by
adding a factory there. Tests of the embedded store's own extras (recover_after_restart, the data-dir
lock, snapshot reads) use the `sqlite_store` and `sqlite_path` fixtures.
"""

import contextlib
import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from kontextd.jobs import outcomes
from kontextd.jobs.model import CancelResult, Job, NewJob, Outcome, Priority, State
from kontextd.jobs.sqlite import MAX_ATTEMPTS, DataDirInUse, SQLiteJobStore
from kontextd.jobs.store import JobStore

APP_ID = "fal-ai/flux-kontext/dev"
LEASE = 60.0
WARN_REQUEUED = "The worker running this request stopped; it was queued again"

# -- store construction: one factory per store kind ----------------------------------------------------

StoreOpener = Callable[[], JobStore]


def _sqlite_opener(tmp_path: Path) -> StoreOpener:
    path = tmp_path / "jobs.sqlite3"
    return lambda: SQLiteJobStore(path)


@contextlib.contextmanager
def _sqlite_bulk(store: JobStore) -> Iterator[None]:
    """Run many submits in one transaction (one fsync instead of thousands), through submit itself."""
    assert isinstance(store, SQLiteJobStore)
    connection = store._connection()
    connection.execute("BEGIN IMMEDIATE")
    with mock.patch.object(store, "_write", lambda: contextlib.nullcontext(connection)):
        yield
    connection.execute("COMMIT")


STORES: dict[str, Callable[[Path], StoreOpener]] = {"sqlite": _sqlite_opener}
BULK: dict[str, Callable[[JobStore], contextlib.AbstractContextManager[None]]] = {"sqlite": _sqlite_bulk}


@dataclass
class StoreKind:
    name: str
    open: StoreOpener


@pytest.fixture(params=sorted(STORES))
def store_kind(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreKind]:
    """Opens stores of one kind on one database; every store opened is closed at the end."""
    opened: list[JobStore] = []
    opener = STORES[request.param](tmp_path)

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
    attempts: int = 0
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
            # the next lease sweep recovers: some jobs die again and again until MAX_ATTEMPTS.
            lease = 1_000_000.0 - 2 * step
            lane = rng.choice(LANES)
            expected_claim = None
            for name in order(lane):
                item = queued.pop(name)
                if item.deadline is not None and item.deadline < now:
                    finished[name] = "request_timeout"
                    continue
                item.attempts += 1
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
            if item.cancel_requested:
                finished[name] = "client_cancelled"
            elif item.attempts >= MAX_ATTEMPTS:
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
    for attempt in range(1, MAX_ATTEMPTS + 1):
        job = store.claim("worker-a", 10.0, now)
        assert job is not None and job.attempts == attempt
        now += 11
        assert store.recover_abandoned(now) == 1
    job = get(store, "a")
    assert job.state is State.COMPLETED
    assert job.outcome is not None
    assert job.outcome.error_type == "internal_server_error"
    assert job.outcome.status_code == 500
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


# -- webhooks --------------------------------------------------------------------------------------


def one_delivery(store: JobStore, now: float) -> Any:
    due = store.due_webhooks(now, 10)
    assert len(due) == 1, due
    return due[0]


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
    assert (delivery.request_id, delivery.url, delivery.user_id, delivery.attempts) == (
        "a",
        "https://hooks.example/done",
        "alice",
        0,
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
    bodies = {delivery.request_id: json.loads(delivery.body) for delivery in store.due_webhooks(now, 10)}
    assert set(bodies) == {"cancelled", "late"}
    assert bodies["cancelled"]["status"] == "ERROR"
    assert bodies["cancelled"]["error"] == "Invalid status code: 400"
    assert bodies["cancelled"]["payload"]["error_type"] == "client_cancelled"
    assert bodies["late"]["error"] == "Invalid status code: 504"
    assert bodies["late"]["payload"] == {"detail": "Request timed out", "error_type": "request_timeout"}


def test_webhook_delivery_states(store: JobStore) -> None:
    now = time.time()
    for name in ["delivered", "retried", "given-up"]:
        store.submit(new_job(name, webhook_url=f"https://hooks.example/{name}"))
        store.complete(name, succeeded(), now)
    due = {delivery.request_id: delivery for delivery in store.due_webhooks(now, 10)}
    assert set(due) == {"delivered", "retried", "given-up"}

    store.webhook_attempted(due["delivered"].delivery_id, True, None, "HTTP 200")
    store.webhook_attempted(due["retried"].delivery_id, False, now + 30, "HTTP 500")
    store.webhook_attempted(due["given-up"].delivery_id, False, None, "HTTP 500")
    assert store.due_webhooks(now + 29, 10) == []
    retry = one_delivery(store, now + 30)
    assert retry.request_id == "retried" and retry.attempts == 1
    assert retry.body == due["retried"].body

    store.webhook_attempted(retry.delivery_id, False, now + 90, "connection refused")
    assert store.due_webhooks(now + 89, 10) == []
    retry = one_delivery(store, now + 90)
    assert retry.attempts == 2
    store.webhook_attempted(retry.delivery_id, True, None, "HTTP 204")
    assert store.due_webhooks(now + 10_000, 10) == []


def test_due_webhooks_respects_the_limit_oldest_first(store: JobStore) -> None:
    now = time.time()
    for index in range(4):
        name = f"j{index}"
        store.submit(new_job(name, webhook_url="https://hooks.example/x"))
        store.complete(name, succeeded(), now + index)
    assert [delivery.request_id for delivery in store.due_webhooks(now + 10, 2)] == ["j0", "j1"]


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
    before.submit(new_job("tired"))
    _died(before, "tired", MAX_ATTEMPTS - 1, now)
    before.submit(new_job("interrupted"))
    before.submit(new_job("no-retry", no_retry=True))
    before.submit(new_job("cancel-me"))
    before.submit(new_job("queued-normal"))
    before.submit(new_job("queued-low", priority=Priority.LOW))
    running = [before.claim("worker-old", 3600.0, now) for _ in range(4)]  # leases far from lapsing
    assert [job.request_id for job in running if job] == ["tired", "interrupted", "no-retry", "cancel-me"]
    assert get(before, "tired").attempts == MAX_ATTEMPTS
    assert before.cancel("cancel-me", "alice", now) is CancelResult.REQUESTED
    before.close()  # the process died: nothing else happens to the running jobs

    after = SQLiteJobStore(sqlite_path)
    try:
        assert after.recover_after_restart(now + 5) == 4
        interrupted = get(after, "interrupted")
        assert interrupted.state is State.IN_QUEUE
        assert interrupted.priority is Priority.RETRY
        assert interrupted.started_at is None
        assert positions(after, ["interrupted", "queued-normal", "queued-low"]) == [0, 1, 2]
        warnings = [line for line in after.logs("interrupted") if line.level == "WARN"]
        assert [line.message for line in warnings] == [WARN_REQUEUED]
        assert warnings[0].timestamp == pytest.approx(now + 5)

        no_retry = get(after, "no-retry")
        assert no_retry.state is State.COMPLETED
        assert no_retry.outcome is not None
        assert (no_retry.outcome.status_code, no_retry.outcome.error_type) == (500, "internal_server_error")
        assert no_retry.outcome.body["error_type"] == "internal_server_error"

        tired = get(after, "tired")
        assert tired.state is State.COMPLETED
        assert tired.outcome is not None and tired.outcome.error_type == "internal_server_error"
        # Re-queued twice before, failed (not re-queued) the third time.
        assert [line.message for line in after.logs("tired")] == [WARN_REQUEUED] * (MAX_ATTEMPTS - 1)

        cancelled = get(after, "cancel-me")
        assert cancelled.state is State.COMPLETED
        assert cancelled.outcome is not None and cancelled.outcome.error_type == "client_cancelled"
        assert after.logs("no-retry") == [] and after.logs("cancel-me") == []

        assert after.recover_after_restart(now + 6) == 0
        job = after.claim("worker-new", LEASE, now + 7)
        assert job is not None and job.request_id == "interrupted" and job.attempts == 2
        assert claimed_ids(after, now + 7) == ["queued-normal", "queued-low"]
    finally:
        after.close()


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
