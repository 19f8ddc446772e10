"""What happens to a running request that stops short: the rules every job store applies the same way.

A request stops short when its worker is lost (lease lapsed while the server runs), when the server died
under it (found at the next start), when the server stops gracefully, or when its images could not be
stored. Only the first is the request's own doing; the others are counted apart, or not at all, so a
crash never fails an innocent request, while a request that keeps killing the server is still stopped.
"""

from collections.abc import Callable
from dataclasses import dataclass

from kontextd.jobs import outcomes
from kontextd.jobs.model import Outcome, Release

MAX_FAILURES = 3  # a request whose worker was lost this often (lease lapsed) is failed, not retried forever
MAX_INTERRUPTIONS = 10  # a request the server died under this often is failed: it may be what kills it
MAX_STORAGE_FAILURES = 5  # a request whose images could not be stored this often ends with storage_error
# A worker preferred for a job (it has the job's LoRAs loaded, or ran its runner hint) may take it before
# the head of the queue when it is at most this many tickets behind: the head is passed over at most this
# many times, however many such jobs keep coming.
AFFINITY_WINDOW = 16

REQUEUED_LEASE = "The worker running this request stopped; it was queued again"
REQUEUED_RESTART = "The server stopped while this request ran; it was queued again"
REQUEUED_SHUTDOWN = "The server is shutting down; this request was queued again and runs again from the start"
REQUEUED_STORAGE = "Its images could not be stored (disk full or storage unavailable); it was queued again"


def _not_retried() -> Outcome:
    return outcomes.internal_error("The worker stopped; not retried (x-fal-no-retry)")


@dataclass(frozen=True)
class Requeue:
    """One reason a running request stops short: what it counts, up to what limit, what its logs say."""

    requeued: str  # the WARN line in the request's logs when it is queued again
    counter: str | None = None  # the Job counter (a store column) this reason adds to; None: not counted
    limit: int = 0
    given_up: Callable[[int], Outcome] = (
        outcomes.storage_error
    )  # how it ends once the count reaches the limit
    not_retried: Callable[[], Outcome] = _not_retried  # how an x-fal-no-retry request ends instead

    def ending(self, count: int, cancel_requested: bool, no_retry: bool) -> Outcome | None:
        """How the request ends now that it stopped for this reason the `count`th time, or None when it
        goes back to the head of its queue to run again from the start."""
        if cancel_requested:
            return outcomes.cancelled()
        if no_retry:
            return self.not_retried()
        if self.counter and count >= self.limit:
            return self.given_up(count)
        return None


LEASE_LAPSED = Requeue(
    REQUEUED_LEASE,
    "failures",
    MAX_FAILURES,
    lambda count: outcomes.internal_error(f"The worker running this request stopped {count} times"),
)
INTERRUPTED = Requeue(
    REQUEUED_RESTART,
    "interruptions",
    MAX_INTERRUPTIONS,
    lambda count: outcomes.internal_error(
        f"The server stopped {count} times while this request ran; it is not run again"
    ),
)
RELEASES = {
    Release.SHUTDOWN: Requeue(REQUEUED_SHUTDOWN),  # a graceful stop is nobody's fault: never counted
    Release.STORAGE_FULL: Requeue(
        REQUEUED_STORAGE,
        "storage_failures",
        MAX_STORAGE_FAILURES,
        not_retried=lambda: outcomes.storage_error(1),
    ),
}

# The Job counters (store columns) the reasons above add to: the only column names a store's counting
# statement is ever made with.
COUNTERS: tuple[str, ...] = tuple(
    dict.fromkeys(why.counter for why in (LEASE_LAPSED, INTERRUPTED, *RELEASES.values()) if why.counter)
)
