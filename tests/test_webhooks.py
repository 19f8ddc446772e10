"""Webhook delivery: every configured try and then give-up, the fetch guard on every try, receivers that
hang without delaying others, and at-least-once delivery with a stable id across crashes.

The server tests run kontextd as a real process on loopback. The dispatcher tests run `WebhookDispatcher`
in this process against a real SQLite store and real loopback receivers, where its limits are observable.
"""

import contextlib
import http.server
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import KontextdServer, LoopbackServer, dispatching, wait_completed, wait_for

from kontextd.jobs import outcomes
from kontextd.jobs.model import NewJob
from kontextd.jobs.sqlite import SQLiteJobStore
from kontextd.webhooks.delivery import WEBHOOK_ID_HEADER, WebhookDispatcher
from kontextd.webhooks.signing import verify_webhook

APP_ID = "fal-ai/flux-kontext/dev"
BACKOFF = "0.2,0.2,0.2"  # four tries in all
HOLD_LIMIT_SECONDS = 120  # a held POST is answered after this even if a test forgot to release it
ALWAYS = 10**9
RELEASED_AT_START = "webhook tries cut short by the last stop will be retried"


# -- loopback receivers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes

    @property
    def request_id(self) -> str:
        return json.loads(self.body)["request_id"]

    @property
    def webhook_id(self) -> str | None:
        return self.headers.get(WEBHOOK_ID_HEADER.lower())


class Receiver:
    """A webhook endpoint on 127.0.0.1 (on `ports` ports sharing one record) that records every
    connection and POST. The first `fail` POSTs are answered 500, the rest 200; the first `hold` POSTs
    block until `release` is set: a receiver that hangs."""

    def __init__(self, fail: int = 0, hold: int = 0, ports: int = 1) -> None:
        self.fail = fail
        self.hold = hold
        self.release = threading.Event()
        self.hits: list[Hit] = []
        self.connections = 0
        self.active = 0  # POSTs received and not answered yet
        self.most_active = 0
        self._lock = threading.Lock()
        self._servers = [self._serve() for _ in range(ports)]
        self.urls = [f"http://127.0.0.1:{server.server_port}" for server in self._servers]
        self.url = self.urls[0]

    def _serve(self) -> http.server.ThreadingHTTPServer:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver._answer(self)

            def log_message(self, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def verify_request(self, request: object, client_address: object) -> bool:
                with receiver._lock:
                    receiver.connections += 1
                return True

        server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def _answer(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length", "0")))
        with self._lock:
            self.hits.append(Hit(handler.path, {k.lower(): v for k, v in handler.headers.items()}, body))
            number = len(self.hits)
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        if number <= self.hold:
            self.release.wait(HOLD_LIMIT_SECONDS)
        with self._lock:  # before answering: once answered, the sender may start its next try at once
            self.active -= 1
        try:
            handler.send_response(500 if number <= self.fail else 200)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
        except OSError:
            pass  # the sender is gone (timed out, stopped, killed) while we held its POST

    def hits_for(self, request_id: str) -> list[Hit]:
        return [hit for hit in list(self.hits) if hit.request_id == request_id]

    def close(self) -> None:
        self.release.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(**options: Any) -> Receiver:
        made.append(Receiver(**options))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


# -- the server, and what it logs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KontextdServer]:
    """One server for the tests that each use receivers of their own."""
    instance = KontextdServer(tmp_path_factory.mktemp("webhooks"), args=["--webhook-backoff", BACKOFF])
    yield instance.start()
    instance.stop()


def start(servers: list[KontextdServer], data_dir: Path, *args: str) -> KontextdServer:
    server = KontextdServer(data_dir, args=["--webhook-backoff", BACKOFF, *args])
    servers.append(server)
    return server.start()


def submit(client: httpx.Client, image_host: LoopbackServer, hook: str) -> str:
    """A request that ends within moments of being run (its image is not one: a 422) and reports to `hook`:
    what these tests time is delivery, never generation."""
    body = {"prompt": "a red kite", "image_url": f"{image_host.url}/not-an-image"}
    response = client.post(f"/{APP_ID}", params={"fal_webhook": hook}, json=body)
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def status_path(request_id: str) -> str:
    return f"/fal-ai/flux-kontext/requests/{request_id}/status"


def log_entries(server: KontextdServer, message: str) -> list[dict[str, Any]]:
    entries = []
    for line in list(server.output):
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                entry = json.loads(line)
                if entry.get("message") == message:
                    entries.append(entry)
    return entries


def attempts(server: KontextdServer, request_id: str) -> list[dict[str, Any]]:
    """The server's record of each finished try, logged once the store has it."""
    return [
        entry for entry in log_entries(server, "webhook attempt") if entry.get("request_id") == request_id
    ]


def ended(server: KontextdServer, request_id: str) -> dict[str, Any] | None:
    """The try that ended the delivery (delivered or given up), once it is stored."""
    return next((e for e in attempts(server, request_id) if e["outcome"] in ("delivered", "failed")), None)


def later_round(
    client: httpx.Client, server: KontextdServer, image_host: LoopbackServer, receiver: Receiver
) -> None:
    """A barrier: a delivery made now that needs a retry has ended, so the dispatcher has been through
    rounds after a gap of the backoff; anything else due by then has been sent."""
    request_id = submit(client, image_host, f"{receiver.url}/later")
    wait_for(lambda: ended(server, request_id), timeout=60)
    assert [hit.path for hit in receiver.hits_for(request_id)] == ["/later", "/later"]


# -- every try, then give up ---------------------------------------------------------------------------


def test_a_receiver_that_always_fails_gets_every_configured_try_then_is_given_up(
    shared: KontextdServer,
    receivers: Callable[..., Receiver],
    image_host: LoopbackServer,
) -> None:
    failing = receivers(fail=ALWAYS)
    with shared.client() as client:
        request_id = submit(client, image_host, f"{failing.url}/hook")
        final = wait_for(lambda: ended(shared, request_id), timeout=60)
        later_round(client, shared, image_host, receivers(fail=1))  # a fifth try would have gone out by now

    assert (final["try"], final["outcome"], final["error"]) == (4, "failed", "HTTP 500")
    assert [(entry["try"], entry["outcome"]) for entry in attempts(shared, request_id)] == [
        (1, "retry"),
        (2, "retry"),
        (3, "retry"),
        (4, "failed"),
    ]
    hits = failing.hits_for(request_id)
    assert len(hits) == 4 == len(failing.hits)
    assert len({hit.body for hit in hits}) == 1
    assert hits[0].webhook_id and all(hit.webhook_id == hits[0].webhook_id for hit in hits)


# -- the fetch guard decides at every try --------------------------------------------------------------


def test_a_webhook_target_the_guard_refuses_is_never_contacted_and_the_delivery_fails(
    tmp_path: Path,
    servers: list[KontextdServer],
    receivers: Callable[..., Receiver],
    image_host: LoopbackServer,
) -> None:
    receiver = receivers()
    data_dir = tmp_path / "data"
    # Accepted while loopback was allowed (the fixture's --fetch-allow 127.0.0.1), left queued: no workers.
    first = start(servers, data_dir, "--workers", "0")
    with first.client() as client:
        request_id = submit(client, image_host, f"{receiver.url}/hook")
        assert client.get(status_path(request_id)).json()["status"] == "IN_QUEUE"
    first.stop()

    # Restarted without the allow-list (the last --fetch-allow wins): loopback is refused now.
    second = start(servers, data_dir, "--fetch-allow", "")
    with second.client() as client:
        wait_completed(client, status_path(request_id), timeout=60)
        final = wait_for(lambda: ended(second, request_id), timeout=60)
    second.stop()

    assert receiver.connections == 0 and receiver.hits == []
    assert final["outcome"] == "failed"
    refusal = f"Refused to fetch {receiver.url}/hook: 127.0.0.1 is a loopback address"
    # One try: a refused address stays refused, so the backoff's tries would only delay the verdict.
    assert [entry["error"] for entry in attempts(second, request_id)] == [refusal]
    store = SQLiteJobStore(data_dir / "jobs.sqlite3")
    try:
        (delivery,) = store.webhook_deliveries(request_id)
        assert (delivery.state, delivery.attempts, delivery.last_error) == ("failed", 1, refusal)
    finally:
        store.close()


# -- receivers are independent -------------------------------------------------------------------------


def test_a_hanging_receiver_does_not_delay_another_receivers_webhook(
    shared: KontextdServer,
    receivers: Callable[..., Receiver],
    image_host: LoopbackServer,
) -> None:
    hanging, other = receivers(hold=ALWAYS), receivers()
    with shared.client() as client:
        stuck = submit(client, image_host, f"{hanging.url}/hook")
        wait_for(lambda: hanging.hits_for(stuck), timeout=60)  # its POST is in flight, held

        prompt = submit(client, image_host, f"{other.url}/hook")
        wait_for(lambda: other.hits_for(prompt), timeout=60)
        # The order is the point: the other webhook arrived while the first try was still held open.
        assert attempts(shared, stuck) == [] and hanging.active == 1

        hanging.release.set()
        final = wait_for(lambda: ended(shared, stuck), timeout=60)
    assert (final["try"], final["outcome"]) == (1, "delivered")
    assert len(hanging.hits) == 1


# -- at least once, with a stable delivery id ----------------------------------------------------------


def test_each_request_gets_exactly_one_post_with_its_own_delivery_id(
    shared: KontextdServer,
    receivers: Callable[..., Receiver],
    image_host: LoopbackServer,
) -> None:
    receiver = receivers()
    with shared.client() as client:
        request_ids = [submit(client, image_host, f"{receiver.url}/hook") for _ in range(3)]
        wait_for(lambda: all(ended(shared, request_id) for request_id in request_ids), timeout=60)
        later_round(client, shared, image_host, receivers(fail=1))  # a duplicate would have gone out by now
        jwks = client.get("/.well-known/jwks.json").json()

    hits = {request_id: receiver.hits_for(request_id) for request_id in request_ids}
    assert [len(got) for got in hits.values()] == [1, 1, 1]
    assert len(receiver.hits) == 3
    ids = [got[0].webhook_id for got in hits.values()]
    assert all(ids) and len(set(ids)) == 3
    assert all(verify_webhook(jwks, got[0].headers, got[0].body) for got in hits.values())


def test_a_kill9_mid_delivery_retries_it_with_the_same_delivery_id(
    tmp_path: Path,
    servers: list[KontextdServer],
    receivers: Callable[..., Receiver],
    image_host: LoopbackServer,
) -> None:
    receiver = receivers(hold=1)  # the first try hangs until the test lets it go
    later = receivers(fail=1)
    data_dir = tmp_path / "data"
    first = start(servers, data_dir)
    with first.client() as client:
        request_id = submit(client, image_host, f"{receiver.url}/hook")
        wait_for(lambda: receiver.hits_for(request_id), timeout=60)
    first.kill9()  # the POST is in flight: no outcome was recorded
    assert attempts(first, request_id) == []

    second = start(servers, data_dir)
    # Marked in flight before it was sent: the new process retries it at start-up, not a deadline later.
    (released,) = wait_for(lambda: log_entries(second, RELEASED_AT_START))
    assert released["count"] == 1
    wait_for(lambda: len(receiver.hits_for(request_id)) >= 2, timeout=60)
    receiver.release.set()
    with second.client() as client:
        final = wait_for(lambda: ended(second, request_id), timeout=60)
        later_round(client, second, image_host, later)

    assert (final["try"], final["outcome"]) == (1, "delivered")  # the try cut short does not count
    first_try, retry = receiver.hits_for(request_id)
    assert len(receiver.hits) == 2
    assert first_try.webhook_id and retry.webhook_id == first_try.webhook_id
    assert retry.body == first_try.body
    assert retry.headers["x-fal-webhook-request-id"] == request_id


# -- the dispatcher in this process: its limits, deadlines and shutdown ---------------------------------


def finished(store: SQLiteJobStore, url: str, count: int = 1) -> list[str]:
    """`count` requests that ended now, each with a webhook to `url`."""
    names = []
    for _ in range(count):
        job = NewJob(
            request_id=str(uuid.uuid4()),
            gateway_request_id="g",
            app_id=APP_ID,
            owner="alice",
            input={"prompt": "x"},
            webhook_url=url,
        )
        store.submit(job)
        store.complete(job.request_id, outcomes.succeeded({"images": []}, 0.1, (), "local/tiny"), time.time())
        names.append(job.request_id)
    return names


def state_of(store: SQLiteJobStore, request_id: str) -> tuple[str, int]:
    (delivery,) = store.webhook_deliveries(request_id)
    return delivery.state, delivery.attempts


def rounds_later(dispatcher: WebhookDispatcher, count: int = 3) -> None:
    """A barrier: the dispatcher has looked for due deliveries `count` more times."""
    target = dispatcher.rounds + count
    wait_for(lambda: dispatcher.rounds >= target, timeout=30)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteJobStore]:
    opened = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    yield opened
    opened.close()


def test_tries_to_one_receiver_are_limited_while_other_receivers_go_ahead(
    store: SQLiteJobStore, receivers: Callable[..., Receiver]
) -> None:
    hanging, other = receivers(hold=ALWAYS), receivers()
    stuck = finished(store, f"{hanging.url}/hook", count=5)
    with dispatching(store, per_target=2) as dispatcher:
        wait_for(lambda: len(hanging.hits) >= 2)
        prompt = finished(store, f"{other.url}/hook")  # due after all five
        wait_for(lambda: state_of(store, prompt[0]) == ("delivered", 1))
        rounds_later(dispatcher)
        assert len(hanging.hits) == 2 and hanging.active == 2  # the other three wait for a free slot
        hanging.release.set()
        wait_for(lambda: all(state_of(store, name) == ("delivered", 1) for name in stuck))
    assert hanging.most_active == 2
    assert sorted(hit.request_id for hit in hanging.hits) == sorted(stuck)


def test_tries_in_flight_are_capped_overall(
    store: SQLiteJobStore, receivers: Callable[..., Receiver]
) -> None:
    hanging = receivers(hold=ALWAYS, ports=2)  # two receivers (ports) recorded as one
    stuck = [name for url in hanging.urls for name in finished(store, f"{url}/hook", count=3)]
    with dispatching(store, per_target=2, overall=3) as dispatcher:
        wait_for(lambda: len(hanging.hits) >= 3)
        rounds_later(dispatcher)
        assert len(hanging.hits) == 3 and hanging.active == 3
        assert {hit.request_id for hit in hanging.hits} & set(stuck[3:])  # both receivers have a try
        hanging.release.set()
        wait_for(lambda: all(state_of(store, name) == ("delivered", 1) for name in stuck))
    assert hanging.most_active == 3


def test_a_try_still_in_flight_past_its_deadline_is_not_sent_again(
    store: SQLiteJobStore, receivers: Callable[..., Receiver]
) -> None:
    hanging = receivers(hold=ALWAYS)
    (name,) = finished(store, f"{hanging.url}/hook")
    with dispatching(store, deadline_seconds=0.1) as dispatcher:
        wait_for(lambda: hanging.hits)
        wait_for(lambda: store.due_webhooks(time.time(), 10))  # the store would hand it out again now
        rounds_later(dispatcher, 5)
        assert len(hanging.hits) == 1
        hanging.release.set()
        wait_for(lambda: state_of(store, name) == ("delivered", 1))
    assert len(hanging.hits) == 1


def test_every_configured_try_then_the_delivery_is_recorded_failed(
    store: SQLiteJobStore, receivers: Callable[..., Receiver]
) -> None:
    failing = receivers(fail=ALWAYS)
    (name,) = finished(store, f"{failing.url}/hook")
    with dispatching(store, backoff=(0.05, 0.05, 0.05)):
        wait_for(lambda: state_of(store, name)[0] == "failed")
        assert len(failing.hits) == 4
    (delivery,) = store.webhook_deliveries(name)
    assert (delivery.attempts, delivery.last_error) == (4, "HTTP 500")


def test_shutdown_stops_a_hanging_try_at_once_and_it_is_retried_with_the_same_id(
    store: SQLiteJobStore, receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers(hold=1)
    (name,) = finished(store, f"{receiver.url}/hook")
    with dispatching(store):
        wait_for(lambda: receiver.hits)
    # Stopped while the receiver still holds the POST (the fetch timeout is 20 s): nothing waited for it.
    assert receiver.active == 1
    assert state_of(store, name) == ("pending", 0)  # due again, the cut-short try not counted
    assert [due.request_id for due in store.due_webhooks(time.time(), 10)] == [name]

    with dispatching(store):
        wait_for(lambda: state_of(store, name) == ("delivered", 1))
    first_try, retry = receiver.hits
    assert first_try.webhook_id and retry.webhook_id == first_try.webhook_id
    assert retry.body == first_try.body
