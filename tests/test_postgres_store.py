"""The shared PostgreSQL store's own behaviour: what several processes on one database see.

The contract suite (tests/test_job_store.py) already runs over this store. Here: the counterparts of the
embedded store's start-up rules (a shared store never takes another node's running jobs or in-flight
webhooks), two store instances on one database standing in for two processes (concurrent claims, sweeps,
positions, notifications, secrets, turns), schema versions, and a database that goes away and comes back.
"""

import asyncio
import contextlib
import itertools
import os
import random
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from kontextd.jobs import poll_cache, postgres
from kontextd.jobs.factory import open_store
from kontextd.jobs.model import CancelResult, Polled, Priority, State
from kontextd.jobs.postgres import SCHEMA_VERSION, PostgresJobStore, SchemaTooNew
from kontextd.jobs.sqlite import SQLiteJobStore
from kontextd.jobs.store import StoreUnavailable
from tests.pg_fixtures import PrivateCluster, _free_port
from tests.test_job_store import (
    APP_ID,
    LEASE,
    WARN_REQUEUED,
    claim,
    delivery_of,
    finished_with_webhook,
    get,
    new_job,
    succeeded,
    webhooks_in_flight,
)

NOTIFY_SECONDS = 1.0  # a change made through one node wakes another's listener within this


@pytest.fixture
def nodes(pg_dsn: str) -> Iterator[Callable[[], PostgresJobStore]]:
    """Opens store instances on one database, as separate processes would; all closed at the end."""
    opened: list[PostgresJobStore] = []

    def open_node() -> PostgresJobStore:
        node = PostgresJobStore(pg_dsn)
        opened.append(node)
        return node

    yield open_node
    for node in opened:
        with contextlib.suppress(Exception):
            node.close()


def run_together(*targets: Callable[[], Any], seconds: float = 60) -> list[Any]:
    """Run each target in a thread of its own, started together; their results, or the first error."""
    start = threading.Barrier(len(targets))
    results: list[Any] = [None] * len(targets)
    errors: list[BaseException] = []

    def run(index: int, target: Callable[[], Any]) -> None:
        try:
            start.wait()
            results[index] = target()
        except BaseException as error:  # handed to the test below
            errors.append(error)

    threads = [threading.Thread(target=run, args=item) for item in enumerate(targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


def raw(dsn: str) -> psycopg.Connection[Any]:
    """A connection of the test's own to the store's database (autocommit)."""
    return psycopg.connect(dsn, autocommit=True)


# -- the start-up rules of a shared store -------------------------------------------------------------


def test_recover_after_restart_requeues_nothing_in_a_shared_store(
    nodes: Callable[[], PostgresJobStore],
) -> None:
    now = time.time()
    first = nodes()
    first.submit(new_job("running"))
    first.submit(new_job("queued"))
    assert claim(first, now, worker_id="node-1") is not None

    second = nodes()  # another node starting up while the first runs its job
    assert second.shared is True
    assert second.recover_after_restart(now + 1) == 0
    job = get(second, "running")
    assert (job.state, job.interruptions, job.failures) == (State.IN_PROGRESS, 0, 0)
    assert second.queue_position("queued") == 0
    assert first.renew_lease("running", "node-1", LEASE, now + 1) is True  # still the first node's

    # Only a lapsed lease hands it over, and only once whichever node sweeps.
    assert second.recover_abandoned(now + 30) == 0
    assert second.recover_abandoned(now + 1 + LEASE + 1) == 1
    assert first.recover_abandoned(now + 1 + LEASE + 1) == 0
    assert (get(first, "running").state, get(first, "running").failures) == (State.IN_QUEUE, 1)
    assert first.complete("running", succeeded(), now + 100, worker_id="node-1") is False


def test_release_webhooks_without_ids_releases_nothing_in_a_shared_store(
    nodes: Callable[[], PostgresJobStore],
) -> None:
    """Another node may be sending them right now: releasing them would send them twice at once."""
    now = time.time()
    store = nodes()
    ids = webhooks_in_flight(store, now)
    assert store.release_webhooks(now + 2) == 0
    assert [delivery_of(store, name).state for name in ["a", "b", "c"]] == ["sending"] * 3
    assert store.due_webhooks(now + 2, 10) == []
    assert store.release_webhooks(now + 2, [ids["b"]]) == 1  # named ones (our own shutdown) still are
    assert [due.request_id for due in store.due_webhooks(now + 2, 10)] == ["b"]


def test_a_webhook_in_flight_when_its_node_died_is_due_once_its_deadline_lapses(
    nodes: Callable[[], PostgresJobStore],
) -> None:
    now = time.time()
    dead = nodes()
    delivery_id = finished_with_webhook(dead, "a", now)
    assert dead.start_webhook(delivery_id, now, now + 50) is not None
    dead.close()  # the node died mid-send

    survivor = nodes()
    assert survivor.release_webhooks(now + 1) == 0
    assert survivor.due_webhooks(now + 1, 10) == []
    assert [due.delivery_id for due in survivor.due_webhooks(now + 50, 10)] == [delivery_id]
    retried = survivor.start_webhook(delivery_id, now + 50, now + 100)
    assert retried is not None and retried.attempts == 0  # the try cut short is not counted


# -- several nodes at once ----------------------------------------------------------------------------


def test_concurrent_claims_from_two_nodes_take_every_job_exactly_once(
    nodes: Callable[[], PostgresJobStore],
) -> None:
    now = time.time()
    first, second = nodes(), nodes()
    total, late = 240, 24
    for index in range(total):
        # Some are past their start deadline: timed out on the way, each exactly once (one webhook each).
        deadline = now - 1 if index % (total // late) == 0 else None
        first.submit(new_job(f"job-{index}", start_deadline=deadline, webhook_url="https://hooks.example/x"))

    def worker(node: PostgresJobStore, name: str) -> list[str]:
        taken = []
        while (job := node.claim(name, LEASE, now)) is not None:
            taken.append(job.request_id)
            assert node.complete(job.request_id, succeeded(), now, worker_id=name) is True
        return taken

    workers = [
        lambda node=node, k=k: worker(node, f"w{k}") for k in range(8) for node in [[first, second][k % 2]]
    ]
    claimed = [name for taken in run_together(*workers) for name in taken]
    counted = Counter(claimed)
    assert max(counted.values()) == 1, [name for name, times in counted.items() if times > 1]
    assert len(claimed) == total - late
    for index in range(total):
        job = get(second, f"job-{index}")
        assert job.state is State.COMPLETED
        assert job.attempts == (0 if index % (total // late) == 0 else 1)
        assert len(second.webhook_deliveries(f"job-{index}")) == 1


def test_a_claim_skips_a_job_another_node_holds_instead_of_waiting(
    nodes: Callable[[], PostgresJobStore], pg_dsn: str
) -> None:
    """Claims and sweeps never wait for each other: a row locked elsewhere is passed over at once."""
    now = time.time()
    store = nodes()
    store.submit(new_job("head", start_deadline=now - 1))
    store.submit(new_job("next"))
    with raw(pg_dsn) as holder, holder.transaction():
        holder.execute("SELECT 1 FROM kontextd_jobs WHERE request_id = 'head' FOR UPDATE")
        started = time.monotonic()
        job = store.claim("w", LEASE, now)
        assert store.expire_unstarted(now) == 0  # the holder has it: skipped, not waited for
        assert time.monotonic() - started < 1.0
        assert job is not None and job.request_id == "next"
    assert store.expire_unstarted(now) == 1
    assert get(store, "head").outcome is not None


def test_sweeps_on_several_nodes_at_once_recover_each_lapsed_lease_once(
    nodes: Callable[[], PostgresJobStore],
) -> None:
    now = time.time()
    first, second = nodes(), nodes()
    for index in range(60):
        first.submit(new_job(f"job-{index}"))
        assert first.claim("dying-worker", 1.0, now) is not None
    swept = run_together(*[lambda node=node: node.recover_abandoned(now + 5) for node in [first, second] * 3])
    assert sum(swept) == 60
    for index in range(60):
        job = get(second, f"job-{index}")
        assert (job.state, job.failures) == (State.IN_QUEUE, 1)
        assert [line.message for line in second.logs(f"job-{index}")] == [WARN_REQUEUED]
    assert sorted(second.queue_position(f"job-{index}") for index in range(60)) == list(range(60))


def test_each_webhook_try_is_taken_by_exactly_one_node(nodes: Callable[[], PostgresJobStore]) -> None:
    now = time.time()
    first, second = nodes(), nodes()
    delivery_id = finished_with_webhook(first, "a", now)
    taken = run_together(
        *[lambda node=node: node.start_webhook(delivery_id, now, now + 30) for node in [first, second] * 4]
    )
    assert sum(result is not None for result in taken) == 1


def brute_force_positions(dsn: str) -> dict[str, int]:
    """Every queued job's position, counted the slow way: its rank in its lane by (priority, ticket)."""
    with raw(dsn) as connection:
        found = connection.execute(
            "SELECT request_id, row_number() OVER (PARTITION BY lane ORDER BY priority, ticket) - 1"
            " FROM kontextd_jobs WHERE state = 'IN_QUEUE'"
        ).fetchall()
    return dict(found)


def test_queue_positions_stay_exact_under_concurrent_submits_claims_and_cancels(
    nodes: Callable[[], PostgresJobStore], pg_dsn: str
) -> None:
    """Rounds of submits (two levels), claims and cancels from two nodes at once. While they run, a
    watched job's position only ever goes down (nothing is queued ahead of it) until it is claimed; once
    they stop, every queued job's position equals its brute-force rank. Off-by-one arithmetic, tickets
    handed out twice or out of commit order, or positions read across snapshots all break one of these."""
    now = time.time()
    first, second = nodes(), nodes()
    rng = random.Random(7)
    for index in range(40):
        first.submit(new_job(f"seed-{index}", priority=Priority.LOW if index % 3 else Priority.NORMAL))

    def submitter(node: PostgresJobStore, prefix: str) -> None:
        for index in range(20):
            node.submit(new_job(f"{prefix}-{index}", priority=Priority.LOW if index % 2 else Priority.NORMAL))

    def claimer(node: PostgresJobStore, worker: str) -> None:
        for _ in range(10):
            job = node.claim(worker, LEASE, now)
            if job is not None:
                node.complete(job.request_id, succeeded(), now, worker_id=worker)

    def canceller(node: PostgresJobStore, names: list[str]) -> None:
        for name in names:  # some were claimed meanwhile, or even finished
            assert node.cancel(name, "alice", now) is not CancelResult.NOT_FOUND

    def watch(watched: str, stop: threading.Event) -> list[int | None]:
        seen = []
        while not stop.is_set():
            seen.append(second.queue_position(watched))
        return seen

    def one_round(round_: int) -> None:
        watched = f"watched-{round_}"
        first.submit(new_job(watched))
        doomed = rng.sample(sorted(set(brute_force_positions(pg_dsn)) - {watched}), 10)
        stop = threading.Event()

        def busy() -> None:
            try:
                run_together(
                    lambda: submitter(first, f"r{round_}-a"),
                    lambda: submitter(second, f"r{round_}-b"),
                    lambda: claimer(first, "c"),
                    lambda: claimer(second, "d"),
                    lambda: canceller(second, doomed[:5]),
                    lambda: canceller(first, doomed[5:]),
                )
            finally:
                stop.set()

        _, seen = run_together(busy, lambda: watch(watched, stop))
        assert seen and seen[0] is not None
        numbers = [position for position in seen if position is not None]
        assert numbers == sorted(numbers, reverse=True), f"round {round_}: went up: {seen}"
        assert all(position is None for position in seen[len(numbers) :]), (
            f"round {round_}: came back: {seen}"
        )

        expected = brute_force_positions(pg_dsn)
        assert len(expected) > 20
        for name, position in expected.items():
            assert first.queue_position(name) == position, (round_, name)
        assert second.submit(new_job(f"tail-{round_}", priority=Priority.LOW)) == len(expected)

    for round_ in range(4):
        one_round(round_)


def test_queue_positions_stay_exact_and_cheap_at_100000_queued(
    nodes: Callable[[], PostgresJobStore], pg_dsn: str
) -> None:
    """100,000 queued (seeded directly, as submit would leave them, with a hole every hundred), then
    submits and claims from two nodes while a status poller reads the deepest position."""
    first, second = nodes(), nodes()
    total = 100_000
    with raw(pg_dsn) as connection:
        connection.execute(
            "INSERT INTO kontextd_jobs (request_id, gateway_request_id, app_id, owner, lane, input_json,"
            " state, priority, ticket, created_at)"
            " SELECT 'bulk-' || n, 'g', 'app', 'alice', 'local', '{}',"
            " CASE WHEN n %% 100 = 7 THEN 'COMPLETED' ELSE 'IN_QUEUE' END, 1, n, 0"
            " FROM generate_series(0, %s) AS n",
            (total - 1,),
        )
        connection.execute(
            "INSERT INTO kontextd_queue_holes SELECT 'local', 1, n FROM generate_series(7, %s, 100) AS n",
            (total - 1,),
        )
        connection.execute("INSERT INTO kontextd_queue_tickets VALUES ('local', 1, %s)", (total,))
    deepest = f"bulk-{total - 1}"
    queued = total - total // 100
    assert first.queue_position(deepest) == queued - 1
    stop = threading.Event()

    def poll() -> list[float]:
        spent = []
        while not stop.is_set():
            started = time.perf_counter()
            assert second.queue_position(deepest) is not None
            spent.append(time.perf_counter() - started)
        return spent

    def busy() -> None:
        now = time.time()
        try:
            run_together(
                lambda: [first.submit(new_job(f"new-a-{index}")) for index in range(100)],
                lambda: [
                    second.submit(new_job(f"new-b-{index}", priority=Priority.RETRY)) for index in range(50)
                ],
                lambda: [first.claim("w1", LEASE, now) for _ in range(100)],
                lambda: [second.claim("w2", LEASE, now) for _ in range(100)],
            )
        finally:
            stop.set()

    _, spent = run_together(busy, poll)
    assert len(spent) > 10
    assert statistics.median(spent) < 0.01, statistics.median(spent)
    # The claims took the 50 retries first, then 150 of the seeded ones; 100 normal ones joined behind.
    assert first.queue_position(deepest) == queued - 150 - 1
    assert first.queue_position("new-a-99") == queued - 150 + 99
    with raw(pg_dsn) as connection:
        for name in [deepest, "bulk-50000", "new-a-0", "new-a-99"]:
            brute = connection.execute(
                "SELECT count(*) FROM kontextd_jobs AS other, kontextd_jobs AS job WHERE job.request_id = %s"
                " AND other.state = 'IN_QUEUE' AND other.lane = job.lane"
                " AND (other.priority, other.ticket) < (job.priority, job.ticket)",
                (name,),
            ).fetchone()
            assert brute is not None and second.queue_position(name) == brute[0], name


# -- notifications ------------------------------------------------------------------------------------


class Wakeups:
    """What a listener was told, with a way to wait for a given wake-up."""

    def __init__(self) -> None:
        self.jobs: list[str] = []
        self.lanes: list[str] = []
        self._changed = threading.Condition()

    def on_job(self, request_id: str) -> None:
        with self._changed:
            self.jobs.append(request_id)
            self._changed.notify_all()

    def on_lane(self, lane: str) -> None:
        with self._changed:
            self.lanes.append(lane)
            self._changed.notify_all()

    def wait_for(self, seen: Callable[[], bool], seconds: float = NOTIFY_SECONDS) -> float:
        """Seconds until `seen()` held; fails the test past `seconds`."""
        started = time.monotonic()
        with self._changed:
            assert self._changed.wait_for(seen, seconds), (self.jobs[-5:], self.lanes[-5:])
        return time.monotonic() - started

    def after(self, change: Callable[[], Any], request_id: str) -> float:
        """How long after `change()` (made elsewhere) this listener heard about `request_id`."""
        with self._changed:
            before = self.jobs.count(request_id)
        change()
        return self.wait_for(lambda: self.jobs.count(request_id) > before)


def heard_again(heard: Wakeups, other: PostgresJobStore, prefix: str, seconds: float = 10) -> None:
    """Changes made through `other` until `heard` hears one: wake-ups announced while a listener was
    reconnecting are lost (allowed), so the first ones may go unheard."""
    deadline = time.monotonic() + seconds
    for attempt in itertools.count():
        name = f"{prefix}-{attempt}"
        other.submit(new_job(name))
        with contextlib.suppress(AssertionError):
            heard.wait_for(lambda name=name: name in heard.jobs, 0.5)
            return
        assert time.monotonic() < deadline, "the listener did not come back"


def test_listen_hears_every_kind_of_change_made_through_another_node(
    nodes: Callable[[], PostgresJobStore],
) -> None:
    now = time.time()
    listening, other = nodes(), nodes()
    heard = Wakeups()
    stop = listening.listen(heard.on_job, heard.on_lane)
    try:
        lane = f"lane-{os.urandom(4).hex()}"  # not one another test run could be queueing in
        latencies = [heard.after(lambda: other.submit(new_job("a", lane=lane)), "a")]
        heard.wait_for(lambda: lane in heard.lanes)
        latencies.append(heard.after(lambda: other.claim("w", 1.0, now, lane=lane), "a"))
        latencies.append(heard.after(lambda: other.append_log("a", "step 1/2", "INFO", now), "a"))
        latencies.append(heard.after(lambda: other.cancel("a", "alice", now), "a"))  # the flag
        lanes_before = heard.lanes.count(lane)
        latencies.append(heard.after(lambda: other.recover_abandoned(now + 5), "a"))  # ends it: cancelled
        other.submit(new_job("b", lane=lane, start_deadline=now - 1))
        latencies.append(heard.after(lambda: other.expire_unstarted(now), "b"))
        other.submit(new_job("c", lane=lane))
        heard.wait_for(lambda: heard.lanes.count(lane) >= lanes_before + 2)
        latencies.append(heard.after(lambda: other.complete("c", succeeded(), now), "c"))
        assert max(latencies) < NOTIFY_SECONDS, latencies
    finally:
        stop()


def test_listen_reconnects_after_its_connection_drops_and_stops_promptly(
    nodes: Callable[[], PostgresJobStore], pg_dsn: str
) -> None:
    listening, other = nodes(), nodes()
    heard = Wakeups()
    stop = listening.listen(heard.on_job, heard.on_lane)
    heard.after(lambda: other.submit(new_job("before")), "before")
    with raw(pg_dsn) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'kontextd-listen' AND datname = current_database()"
        ).fetchone()
    assert killed is not None and killed[0] >= 1
    heard_again(heard, other, "after")  # within its backoff
    started = time.monotonic()
    stop()
    assert time.monotonic() - started < 1.0
    heard_so_far = len(heard.jobs)
    other.submit(new_job("after-stop"))
    time.sleep(0.3)  # absence of a wake-up: nothing to wait for but time
    assert len(heard.jobs) == heard_so_far


# -- the status-poll cache (kontextd/jobs/poll_cache.py) ---------------------------------------------


def polled(store: PostgresJobStore, request_id: str, with_logs: bool = False) -> Polled:
    found = asyncio.run(store.poll(request_id, None, with_logs))
    assert found is not None, request_id
    return found


def write_unannounced(dsn: str, request_id: str) -> None:
    """A change no node announces (the store never makes one): it shows whether a poll read the database."""
    with raw(dsn) as admin:
        admin.execute("UPDATE kontextd_jobs SET app_id = 'probe' WHERE request_id = %s", (request_id,))


BARRIER = "barrier"  # a request of its own lane, whose only announcements are settled()'s


def settled(heard: Wakeups, other: PostgresJobStore, now: float) -> None:
    """Until every announcement made so far has been heard: they arrive in order, and a read under way
    when one arrives is not kept, so a test's next poll must come after the last."""
    heard.after(lambda: other.append_log(BARRIER, "a barrier", "INFO", now), BARRIER)


def test_polls_are_answered_from_memory_until_any_node_announces_a_change(
    nodes: Callable[[], PostgresJobStore], pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(poll_cache, "MAX_AGE_SECONDS", 60.0)  # here only announcements refresh a row
    now = time.time()
    polling, other = nodes(), nodes()
    heard = Wakeups()
    stop = polling.listen(heard.on_job, heard.on_lane)
    try:
        lane = f"lane-{os.urandom(4).hex()}"
        other.submit(new_job("head", lane=lane))
        other.submit(new_job("behind", lane=lane))
        heard.wait_for(lambda: heard.lanes.count(lane) == 2)  # each submit's last announcement
        assert polled(polling, "behind").queue_position == 1
        write_unannounced(pg_dsn, "behind")
        assert polled(polling, "behind").summary.app_id == APP_ID  # from memory
        # Another node claims the head: only the head is announced, and the queued row behind it goes too.
        heard.after(lambda: other.claim("w", LEASE, now, lane=lane), "head")
        again = polled(polling, "behind")
        assert (again.queue_position, again.summary.app_id) == (0, "probe")
        # A write transaction through this node that changes no job (a sweep finding nothing, a claim in an
        # empty lane) drops nothing.
        with raw(pg_dsn) as admin:
            admin.execute("UPDATE kontextd_jobs SET app_id = 'probe-2' WHERE request_id = 'behind'")
        assert polling.expire_unstarted(now) == 0
        assert polling.claim("idle", LEASE, now, lane=f"empty-{os.urandom(4).hex()}") is None
        assert polled(polling, "behind").summary.app_id == "probe"
        # With logs is a row of its own, refreshed by a log line written through another node.
        assert polled(polling, "head", with_logs=True).logs == []
        heard.after(lambda: other.append_log("head", "step 1/2", "INFO", now), "head")
        assert [line.message for line in polled(polling, "head", with_logs=True).logs or []] == ["step 1/2"]
    finally:
        stop()


def test_a_nodes_own_write_is_seen_by_its_next_poll_before_its_announcement_comes_back(
    nodes: Callable[[], PostgresJobStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(poll_cache, "MAX_AGE_SECONDS", 60.0)
    now = time.time()
    polling, other = nodes(), nodes()
    heard, stalled, release = Wakeups(), threading.Event(), threading.Event()

    def on_job(request_id: str) -> None:
        if request_id == "stall":  # the listener stops here until the test releases it
            stalled.set()
            release.wait(30)
        heard.on_job(request_id)

    stop = polling.listen(on_job, heard.on_lane)
    try:
        lane = f"lane-{os.urandom(4).hex()}"
        polling.submit(new_job("mine"))
        other.submit(new_job("theirs", lane=lane))
        assert other.claim("w", LEASE, now, lane=lane) is not None
        other.submit(new_job("stall", lane=lane))
        assert stalled.wait(NOTIFY_SECONDS * 5)  # every announcement before it has been heard
        assert polled(polling, "mine").summary.state == State.IN_QUEUE
        assert polled(polling, "theirs").summary.state == State.IN_PROGRESS
        assert other.complete("theirs", succeeded(), now, worker_id="w") is True
        assert polling.cancel("mine", "alice", now) is CancelResult.CANCELLED
        assert polled(polling, "mine").summary.state == State.COMPLETED  # its own write: at once
        assert polled(polling, "theirs").summary.state == State.IN_PROGRESS  # not heard yet
        heard_before = heard.jobs.count("theirs")
        release.set()
        heard.wait_for(lambda: heard.jobs.count("theirs") > heard_before)
        assert polled(polling, "theirs").summary.state == State.COMPLETED
    finally:
        release.set()
        stop()


def test_a_listener_that_lost_its_connection_drops_what_was_kept(
    nodes: Callable[[], PostgresJobStore], pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At once, not when it is back: it is kept away for 4 s here, and the row must be read again well
    before (the listener notices within its poll interval)."""
    monkeypatch.setattr(poll_cache, "MAX_AGE_SECONDS", 60.0)
    monkeypatch.setattr(postgres, "LISTEN_RETRY_SECONDS", (4.0, 4.0))
    now = time.time()
    polling, other = nodes(), nodes()
    heard = Wakeups()
    stop = polling.listen(heard.on_job, heard.on_lane)
    try:
        heard.after(lambda: other.submit(new_job(BARRIER, lane=f"barrier-{os.urandom(4).hex()}")), BARRIER)
        other.submit(new_job("kept"))
        assert other.claim("w", LEASE, now) is not None  # running: only its own change drops it
        settled(heard, other, now)
        assert polled(polling, "kept").summary.state == State.IN_PROGRESS
        write_unannounced(pg_dsn, "kept")
        assert polled(polling, "kept").summary.app_id == APP_ID
        with raw(pg_dsn) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'kontextd-listen' AND datname = current_database()"
            )
        lost_at = time.monotonic()
        while polled(polling, "kept").summary.app_id != "probe":
            assert time.monotonic() - lost_at < 2.0, "a row kept while nothing was heard"
        heard_again(heard, other, "after")  # back: rows are kept again
        settled(heard, other, now)
        assert polled(polling, "kept").summary.app_id == "probe"
        with raw(pg_dsn) as admin:
            admin.execute("UPDATE kontextd_jobs SET app_id = %s WHERE request_id = 'kept'", (APP_ID,))
        assert polled(polling, "kept").summary.app_id == "probe"
    finally:
        stop()


def test_a_poll_cache_of_0_reads_the_database_on_every_poll(pg_dsn: str) -> None:
    with contextlib.closing(PostgresJobStore(pg_dsn, poll_cache=0)) as store:
        heard = Wakeups()
        stop = store.listen(heard.on_job, heard.on_lane)
        try:
            heard.after(lambda: store.submit(new_job("read")), "read")
            assert polled(store, "read").summary.app_id == APP_ID
            write_unannounced(pg_dsn, "read")
            assert polled(store, "read").summary.app_id == "probe"
        finally:
            stop()


# -- secrets and turns --------------------------------------------------------------------------------


def test_secret_gives_every_node_the_same_bytes_when_they_race(nodes: Callable[[], PostgresJobStore]) -> None:
    first, second = nodes(), nodes()
    made: list[bytes] = []

    def make() -> bytes:
        made.append(os.urandom(32))
        return made[-1]

    got = run_together(
        *[lambda node=node: node.secret("webhook-signing", make) for node in [first, second] * 4]
    )
    assert len(set(got)) == 1 and got[0] in made
    assert second.secret("webhook-signing", lambda: pytest.fail("made again")) == got[0]
    assert first.secret("another", lambda: b"other") == b"other"


def test_turn_excludes_other_nodes_while_held_and_is_free_afterwards(
    nodes: Callable[[], PostgresJobStore],
) -> None:
    first, second = nodes(), nodes()
    task = f"sweep-{os.urandom(4).hex()}"  # advisory locks are per database: not one another run holds
    with first.turn(task) as mine:
        assert mine is True
        with second.turn(task) as theirs:
            assert theirs is False
        with first.turn(task) as again:  # another connection of the same node: excluded too
            assert again is False
        with second.turn(f"{task}-other") as unrelated:
            assert unrelated is True
    with second.turn(task) as theirs:
        assert theirs is True
    with pytest.raises(RuntimeError), first.turn(task) as mine:
        assert mine is True
        raise RuntimeError("the chore failed")
    with second.turn(task) as theirs:
        assert theirs is True  # freed even so


# -- schema versions ----------------------------------------------------------------------------------


def schema_version(dsn: str) -> int:
    with raw(dsn) as connection:
        row = connection.execute("SELECT version FROM kontextd_schema_version").fetchone()
    assert row is not None
    return row[0]


def test_a_fresh_database_gets_the_current_schema_even_when_nodes_start_together(pg_dsn: str) -> None:
    stores = run_together(*[lambda: PostgresJobStore(pg_dsn) for _ in range(3)])
    try:
        assert schema_version(pg_dsn) == SCHEMA_VERSION == len(postgres.MIGRATIONS)
        stores[0].submit(new_job("a"))
        assert stores[2].queue_position("a") == 0
    finally:
        for store in stores:
            store.close()


def test_a_newer_node_upgrades_the_database_and_keeps_its_data(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    PostgresJobStore(pg_dsn).close()
    with contextlib.closing(PostgresJobStore(pg_dsn)) as old:
        old.submit(new_job("a"))
    step = "CREATE TABLE kontextd_next_release (x integer)"
    monkeypatch.setattr(postgres, "MIGRATIONS", [*postgres.MIGRATIONS, step])
    monkeypatch.setattr(postgres, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with contextlib.closing(PostgresJobStore(pg_dsn)) as new:
        assert new.queue_position("a") == 0
    assert schema_version(pg_dsn) == SCHEMA_VERSION + 1
    with raw(pg_dsn) as connection:
        connection.execute("SELECT x FROM kontextd_next_release")


def test_a_node_older_than_the_database_refuses_to_start(pg_dsn: str) -> None:
    PostgresJobStore(pg_dsn).close()
    with raw(pg_dsn) as connection:
        connection.execute("UPDATE kontextd_schema_version SET version = %s", (SCHEMA_VERSION + 2,))
    with pytest.raises(SchemaTooNew) as refused:
        PostgresJobStore(pg_dsn)
    message = str(refused.value)
    assert f"version {SCHEMA_VERSION + 2}" in message and f"version {SCHEMA_VERSION}" in message
    assert "upgrade kontextd" in message
    assert schema_version(pg_dsn) == SCHEMA_VERSION + 2  # left as it was


def test_a_database_migrated_while_a_node_runs_makes_that_node_unavailable_on_ping(pg_dsn: str) -> None:
    """A rolling upgrade: a newer node migrates the schema while this one runs. This node's ping (what
    /health reports) says so from then on, inside serving() and outside it, so a load balancer takes it
    out; with the version as it was, ping passes."""
    store = PostgresJobStore(pg_dsn)
    try:

        async def pings() -> list[str]:
            seen = []
            for serving in (False, True):
                async with store.serving() if serving else contextlib.nullcontext():
                    try:
                        await store.ping()
                        seen.append("ok")
                    except StoreUnavailable as error:
                        seen.append(str(error))
            return seen

        assert asyncio.run(pings()) == ["ok", "ok"]
        with raw(pg_dsn) as connection:
            connection.execute("UPDATE kontextd_schema_version SET version = %s", (SCHEMA_VERSION + 1,))
        refused = asyncio.run(pings())
        assert len(refused) == 2 and refused[0] == refused[1], refused
        assert f"version {SCHEMA_VERSION + 1}" in refused[0] and "upgrade kontextd on this node" in refused[0]
    finally:
        store.close()


# -- a database that is slow, away, or unreachable ----------------------------------------------------


def test_status_polls_on_the_async_pool_fail_fast_while_postgresql_is_away_then_recover(
    pg_cluster: PrivateCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """poll() and ping() inside serving(): StoreUnavailable within the bounded wait while the database is
    down (never a hang), and answers again once it is back, on the same pool."""
    monkeypatch.setattr(postgres, "WAIT_SECONDS", 3.0)
    store = PostgresJobStore(pg_cluster.dsn)
    store.submit(new_job("kept"))

    async def scenario() -> None:
        async with store.serving():
            polled = await store.poll("kept", None, False)
            assert polled is not None and polled.queue_position == 0
            pg_cluster.stop("immediate")
            for call in (lambda: store.poll("kept", None, True), store.ping):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await call()
                assert time.monotonic() - started < postgres.WAIT_SECONDS + 5
            pg_cluster.start()
            deadline = time.monotonic() + 15
            while True:
                try:
                    await store.ping()
                    break
                except StoreUnavailable:
                    assert time.monotonic() < deadline, "the async pool did not reconnect"
                    await asyncio.sleep(0.1)
            again = await store.poll("kept", None, True)
            assert again is not None and again.queue_position == 0 and again.logs == []

    try:
        asyncio.run(scenario())
    finally:
        store.close()


def test_a_lock_held_too_long_elsewhere_is_store_unavailable_not_a_hang(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres, "LOCK_TIMEOUT_SECONDS", 0.3)
    now = time.time()
    with contextlib.closing(PostgresJobStore(pg_dsn)) as store:
        store.submit(new_job("a"))
        assert claim(store, now) is not None
        with raw(pg_dsn) as holder, holder.transaction():
            holder.execute("SELECT 1 FROM kontextd_jobs WHERE request_id = 'a' FOR UPDATE")
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="lock timeout"):
                store.cancel("a", "alice", now)
            assert time.monotonic() - started < 3
            assert get(store, "a").cancel_requested is False  # reads go on meanwhile; nothing changed
        assert store.cancel("a", "alice", now) is CancelResult.REQUESTED


def test_an_unreachable_database_is_store_unavailable_without_the_password() -> None:
    url = f"postgresql://postgres:hunter2-secret@127.0.0.1:{_free_port()}/postgres"
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as refused:
        PostgresJobStore(url)
    assert time.monotonic() - started < 10
    assert "hunter2" not in str(refused.value) and "refused" in str(refused.value).lower()


def test_the_store_survives_postgresql_going_away_and_coming_back(
    pg_cluster: PrivateCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped as a crash would (immediate): calls fail fast with StoreUnavailable, reads and writes
    alike, never hang; once it is back, the pool reconnects by itself and nothing accepted is lost."""
    monkeypatch.setattr(postgres, "WAIT_SECONDS", 3.0)  # the production 10 s only lengthens the test
    now = time.time()
    store = PostgresJobStore(pg_cluster.dsn)
    try:
        heard = Wakeups()
        stop = store.listen(heard.on_job, heard.on_lane)
        store.submit(new_job("kept", webhook_url="https://hooks.example/k"))
        assert store.submit(new_job("also-kept")) == 1

        pg_cluster.stop("immediate")
        for call in [lambda: store.queue_position("kept"), lambda: store.submit(new_job("refused"))]:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                call()
            assert time.monotonic() - started < postgres.WAIT_SECONDS + 5

        pg_cluster.start()
        deadline = time.monotonic() + 15
        while True:
            try:
                position = store.queue_position("kept")
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "the store did not reconnect"
                time.sleep(0.1)
        assert position == 0 and store.get("refused") is None
        job = store.claim("w", LEASE, now)
        assert job is not None and job.request_id == "kept" and job.input == new_job().input
        assert store.complete("kept", succeeded(), now, worker_id="w") is True
        assert len(store.webhook_deliveries("kept")) == 1
        assert store.submit(new_job("after")) == 1
        heard_again(heard, store, "listener-back")
        stop()
    finally:
        store.close()


# -- opening a store by URL ---------------------------------------------------------------------------


def test_open_store_by_url(tmp_path: Path, pg_dsn: str) -> None:
    sqlite = open_store(f"sqlite://{tmp_path / 'jobs.sqlite3'}")
    try:
        assert isinstance(sqlite, SQLiteJobStore) and sqlite.shared is False
    finally:
        sqlite.close()
    for scheme in ["postgresql", "postgres"]:
        store = open_store(pg_dsn.replace("postgresql://", f"{scheme}://", 1))
        try:
            assert isinstance(store, PostgresJobStore) and store.shared is True
        finally:
            store.close()
    for url, named in [
        ("mysql://root:hunter2@db/jobs", "'mysql'"),
        ("sqlite://relative/jobs.sqlite3", "absolute path"),
        ("/var/lib/jobs.sqlite3", "no scheme"),
    ]:
        with pytest.raises(ValueError, match=named) as refused:
            open_store(url)
        assert "hunter2" not in str(refused.value)
        assert "sqlite:///" in str(refused.value) and "postgresql://" in str(refused.value)
