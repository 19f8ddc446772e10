"""The poll cache's rules (kontextd/jobs/poll_cache.py), one by one, on a clock of the test's own.

tests/test_postgres_store.py proves the same rules through PostgreSQL's announcements between two nodes.
"""

import asyncio
from typing import Any

import pytest

from kontextd.cli import parse
from kontextd.jobs.model import JobSummary, Polled, State
from kontextd.jobs.poll_cache import PollCache, Read


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def row(request_id: str, state: str = "IN_PROGRESS", ahead: int | None = None, owner: str = "alice") -> Read:
    """What a store's read gives the cache: the owner, and the poll."""
    summary = JobSummary(request_id, "fal-ai/flux-kontext/dev", State(state), {}, None, None, False)
    return owner, Polled(summary, ahead, None)


def listening_cache(**options: Any) -> tuple[PollCache, Clock]:
    clock = Clock()
    cache = PollCache(clock=clock, **options)
    cache.set_coherent(True)
    return cache, clock


def keep(cache: PollCache, key: tuple[str, bool], kept: Read) -> None:
    cache.put(key, kept, cache.epoch())


def test_nothing_is_kept_or_answered_unless_the_cache_is_told_every_change() -> None:
    cache = PollCache()
    keep(cache, ("a", False), row("a"))
    assert cache.get(("a", False)) is None
    cache.set_coherent(True)
    assert cache.get(("a", False)) is None  # what was put before listening was never kept
    keep(cache, ("a", False), row("a"))
    assert cache.get(("a", False)) == row("a")
    cache.set_coherent(False)  # lost: everything goes, and nothing is kept meanwhile
    assert cache.get(("a", False)) is None
    keep(cache, ("a", False), row("a"))
    cache.set_coherent(True)
    assert cache.get(("a", False)) is None


def test_a_change_drops_its_own_rows_and_every_queued_row_but_no_other() -> None:
    cache, _ = listening_cache()
    keep(cache, ("running", False), row("running"))
    keep(cache, ("running", True), row("running"))
    keep(cache, ("other", False), row("other", "COMPLETED"))
    keep(cache, ("queued", False), row("queued", "IN_QUEUE", ahead=3))
    keep(cache, ("queued", True), row("queued", "IN_QUEUE", ahead=3))
    cache.changed(["running"])
    assert cache.get(("running", False)) is None and cache.get(("running", True)) is None
    assert cache.get(("queued", False)) is None and cache.get(("queued", True)) is None  # positions move
    assert cache.get(("other", False)) == row("other", "COMPLETED")
    keep(cache, ("queued", False), row("queued", "IN_QUEUE", ahead=2))
    cache.changed([])  # work queued in a lane: positions again, nothing else
    assert cache.get(("queued", False)) is None
    assert cache.get(("other", False)) == row("other", "COMPLETED")


def test_a_row_read_while_something_was_dropped_is_not_kept() -> None:
    cache, _ = listening_cache()
    epoch = cache.epoch()  # a read starts ...
    cache.changed(["unrelated"])  # ... something changes meanwhile ...
    cache.put(("a", False), row("a"), epoch)  # ... and what it read may predate that
    assert cache.get(("a", False)) is None
    epoch = cache.epoch()
    cache.set_coherent(True)  # a reconnect, during a read
    cache.put(("a", False), row("a"), epoch)
    assert cache.get(("a", False)) is None
    keep(cache, ("a", False), row("a"))  # a read with nothing in between is kept
    assert cache.get(("a", False)) == row("a")


def test_a_row_is_answered_up_to_its_max_age_and_not_after() -> None:
    cache, clock = listening_cache(max_age=1.0)
    keep(cache, ("a", False), row("a"))
    clock.now += 1.0
    assert cache.get(("a", False)) == row("a")  # exactly max_age old: still answered
    clock.now += 0.001
    assert cache.get(("a", False)) is None
    keep(cache, ("a", False), row("a", "COMPLETED"))  # read again: a fresh row, a fresh age
    assert cache.get(("a", False)) == row("a", "COMPLETED")


def test_at_most_max_entries_are_kept_the_oldest_dropped_first_whatever_their_state() -> None:
    cache, clock = listening_cache(max_entries=3)
    for name, state in [("old-queued", "IN_QUEUE"), ("settled", "COMPLETED"), ("new-queued", "IN_QUEUE")]:
        keep(cache, (name, False), row(name, state))
        clock.now += 0.1
    keep(cache, ("fourth", False), row("fourth"))
    assert cache.get(("old-queued", False)) is None
    assert all(cache.get((name, False)) is not None for name in ["settled", "new-queued", "fourth"])
    keep(cache, ("fifth", False), row("fifth"))
    assert cache.get(("settled", False)) is None  # now the oldest, though not queued
    keep(cache, ("new-queued", False), row("new-queued", "IN_PROGRESS"))  # a key put again: one row
    assert cache.get(("new-queued", False)) == row("new-queued", "IN_PROGRESS")
    assert cache.get(("fourth", False)) is not None and cache.get(("fifth", False)) is not None


def test_a_max_age_of_0_keeps_nothing() -> None:
    cache, _ = listening_cache(max_age=0.0)  # the clock stands still: an age of exactly 0 too
    keep(cache, ("a", False), row("a"))
    assert cache.get(("a", False)) is None


@pytest.mark.parametrize("value", ["-1", "inf", "nan"])
def test_serve_refuses_a_poll_cache_that_is_not_0_or_more_seconds(value: str) -> None:
    _, settings = parse(["serve", "--poll-cache", value])
    with pytest.raises(ValueError, match="--poll-cache must be 0 or more seconds"):
        settings.check()
    assert parse(["serve", "--poll-cache", "0"])[1].poll_cache == 0.0


def test_poll_reads_through_once_checks_the_owner_every_time_and_keeps_no_unknown_request() -> None:
    cache, _ = listening_cache()
    reads: list[str] = []

    def reader(found: Read | None) -> Any:
        async def read() -> Read | None:
            reads.append("read")
            return found

        return read

    async def scenario() -> list[Polled | None]:
        known = reader(row("a", owner="alice"))
        return [
            await cache.poll("a", "alice", False, known),
            await cache.poll("a", "bob", False, known),  # someone else's: from memory, still refused
            await cache.poll("a", None, False, known),
            await cache.poll("a", None, True, known),  # with logs: a poll of its own
            await cache.poll("b", None, False, reader(None)),
            await cache.poll("b", None, False, reader(None)),  # unknown: read every time
        ]

    answers = asyncio.run(scenario())
    polled = row("a")[1]
    assert answers == [polled, None, polled, polled, None, None]
    assert len(reads) == 4
