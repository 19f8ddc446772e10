"""kontextd's own overhead with the tiny backend: submit latency, dispatch delay, status-poll throughput
against bare apps, and status latency with 10 vs 100,000 queued requests — per job store, side by side.

    .venv/bin/python bench/server_overhead.py [--queued 100000] [--seconds 5]        # SQLite
    .venv/bin/python bench/server_overhead.py --store sqlite --store postgres         # both, side by side
    .venv/bin/python bench/server_overhead.py --store postgresql://user@host/db --skip dispatch

`--store`, repeatable: `sqlite` (the data dir's database), `postgres` (a throwaway database
`kontextd_bench_<random>` made on --pg-admin, the machine's server at 127.0.0.1:5432, dropped at the end)
or a `postgresql://` URL (a schema per phase is made in that database and dropped after it). Every phase
runs kontextd as its own process (`python -m kontextd serve --workers 0 ...`, `--store URL` for
PostgreSQL) on a fresh, empty store.

Status-poll throughput: `wrk -t2 -cC -dSs` against the status URL of a queued request on each store's
node, and against two baselines under the same uvicorn (bench/bare_asgi.py): a bare ASGI app and a bare
Starlette app with one route shaped like the status route, both answering the exact bytes kontextd
answered. The servers run side by side and wrk visits them in turn, `--rounds` times; the medians are
reported, and the ratios of each node to each baseline. Each store's node runs twice: as deployed (a
request polled again is answered from memory until something changes) and with `--poll-cache 0`
(every poll reads the store). The depth phase always runs with `--poll-cache 0`: it measures the
read at that depth. (Without wrk an httpx load generator is used, which measures the client more than
the servers.) `--profile DIR` then polls routes that stop earlier
(404, /health, an unknown request) and samples each node with py-spy (`pip install py-spy`) under wrk
load, printing where a poll's time goes.

Everything runs on loopback. Client and server share the machine, so absolute figures include the
client's own cost; the side-by-side ratios are the point.
"""

import argparse
import asyncio
import contextlib
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # bench.coordination, when run as a script

from bench.coordination import machine, postgres_version  # noqa: E402
from bench.scratch_postgres import ADMIN_DSN, bulk, fresh_schema, throwaway_database  # noqa: E402
from kontextd.jobs.model import NewJob  # noqa: E402
from kontextd.jobs.sqlite import SQLiteJobStore  # noqa: E402
from kontextd.jobs.store import JobStore  # noqa: E402

APP = "fal-ai/flux-pro/kontext/text-to-image"
UNCACHED = ("--poll-cache", "0")  # every status poll reads the store (the poll cache off)
BODY = {"prompt": "a lighthouse at dusk", "seed": 1}
PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")  # pip install py-spy
QUIET_UVICORN = ("--log-level", "warning", "--no-access-log")
PHASES = ("submit", "polls", "dispatch", "depth")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            # 2xx only: kontextd answers 503 while its model loads, and timing then would measure the load.
            if httpx.get(url, timeout=1).is_success:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not start")


@dataclass
class Server:
    base: str
    pid: int


@contextmanager
def serving(command: list[str], health_path: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """Run a server process on a free loopback port until the block ends."""
    port = free_port()
    process = subprocess.Popen(
        [part.replace("{port}", str(port)) for part in command],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ | (env or {}),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base + health_path, process)
        yield Server(base, process.pid)
    finally:
        process.terminate()
        process.wait(30)


def kontextd(
    data_dir: Path, workers: int, store_url: str | None, *flags: str
) -> AbstractContextManager[Server]:
    command = [sys.executable, "-m", "kontextd", "serve", "--port", "{port}", "--data-dir", str(data_dir)]
    command += ["--workers", str(workers), "--log-level", "warning", *flags]
    if store_url:
        command += ["--store", store_url]
    return serving(command, "/health")


def bare(app: str, body_file: Path | None) -> AbstractContextManager[Server]:
    return serving(
        [sys.executable, "-m", "uvicorn", f"bench.bare_asgi:{app}", "--port", "{port}", *QUIET_UVICORN],
        "/",
        {"KONTEXTD_BENCH_BODY_FILE": str(body_file)} if body_file else None,
    )


# -- the stores ------------------------------------------------------------------------------------


@dataclass
class Fresh:
    """One empty store for one phase: where kontextd keeps its files, and how to reach the store."""

    data_dir: Path
    store_url: str | None  # None: the data dir's SQLite database
    open: Callable[[], JobStore]


class StoreKind:
    def __init__(self, name: str, database: str | None = None) -> None:
        self.name = name
        self._database = database  # PostgreSQL: the database each phase makes its schema in
        # Nodes answer repeated polls from memory between changes: polled as deployed, and without it.
        self.variants: list[tuple[str, tuple[str, ...]]] = [("", ()), (", --poll-cache 0", UNCACHED)]

    @contextmanager
    def fresh(self, root: Path) -> Iterator[Fresh]:
        data_dir = Path(tempfile.mkdtemp(prefix=f"{self.name.lower()}-", dir=root))
        if self._database is None:
            yield Fresh(data_dir, None, lambda: SQLiteJobStore(data_dir / "jobs.sqlite3"))
            return
        from kontextd.jobs.postgres import PostgresJobStore

        with fresh_schema(self._database) as url:
            yield Fresh(data_dir, url, lambda: PostgresJobStore(url))


def prefill(store: JobStore, count: int) -> list[str]:
    """Queue `count` requests through the store's own submit (in bulk); returns their ids in order."""
    ids = []
    with bulk(store):
        for _ in range(count):
            request_id = str(uuid.uuid4())
            store.submit(NewJob(request_id, str(uuid.uuid4()), APP, "anonymous", BODY))
            ids.append(request_id)
    return ids


# -- measuring -------------------------------------------------------------------------------------


def percentile(samples: Sequence[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def percentiles(samples: Sequence[float]) -> str:
    return f"p50 {statistics.median(samples) * 1000:.2f} ms, p99 {percentile(samples, 0.99) * 1000:.2f} ms"


def timed_gets(client: httpx.Client, url: str, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        client.get(url).raise_for_status()
        samples.append(time.perf_counter() - started)
    return samples


def poll_throughput(url: str, seconds: float, concurrency: int, expect_ok: bool = True) -> float:
    """Requests per second, with wrk as the load generator when present (a Python client saturates first)."""
    if shutil.which("wrk"):
        output = subprocess.run(
            ["wrk", "-t2", f"-c{concurrency}", f"-d{seconds:g}s", url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        if "Socket errors" in output or ("Non-2xx" in output and expect_ok):
            print(f"# wrk reported errors for {url}:\n{output}")
        return float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    return asyncio.run(_httpx_throughput(url, seconds, concurrency, expect_ok))


async def _httpx_throughput(url: str, seconds: float, concurrency: int, expect_ok: bool) -> float:
    done = 0
    deadline = time.monotonic() + seconds

    async def poller(client: httpx.AsyncClient) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            response = await client.get(url)
            if expect_ok:
                response.raise_for_status()
            done += 1

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency), timeout=30) as client:
        await asyncio.gather(*(poller(client) for _ in range(concurrency)))
    return done / seconds


def status_path(request_id: str) -> str:
    return f"/fal-ai/flux-pro/requests/{request_id}/status"


def submit(client: httpx.Client) -> dict[str, Any]:
    response = client.post(f"/{APP}", json=BODY)
    response.raise_for_status()
    return response.json()


# -- the phases ------------------------------------------------------------------------------------


def submit_latency(kind: StoreKind, root: Path) -> None:
    with (
        kind.fresh(root) as fresh,
        kontextd(fresh.data_dir, 0, fresh.store_url) as server,
        httpx.Client(base_url=server.base, timeout=30) as client,
    ):
        submit(client)  # the first request warms up whatever is lazy
        samples = []
        for _ in range(300):
            started = time.perf_counter()
            submit(client)
            samples.append(time.perf_counter() - started)
    print(f"{kind.name}: submit latency (300 sequential): {percentiles(samples)}")


def poll_table(kinds: Sequence[StoreKind], root: Path, args: argparse.Namespace) -> None:
    """Every store's node and both baselines, up side by side; wrk visits each in turn, every round."""
    with contextlib.ExitStack() as stack:
        targets: dict[str, tuple[Server, str]] = {}  # name -> (server, URL polled)
        body = b""
        for kind in kinds:
            for suffix, flags in kind.variants:
                fresh = stack.enter_context(kind.fresh(root))
                server = stack.enter_context(kontextd(fresh.data_dir, 0, fresh.store_url, *flags))
                with httpx.Client(base_url=server.base, timeout=30) as client:
                    request_id = submit(client)["request_id"]
                    response = client.get(status_path(request_id))
                    response.raise_for_status()
                body = body or response.content
                targets[f"{kind.name} node{suffix}"] = (server, server.base + status_path(request_id))
        nodes = list(targets)
        body_file = root / "status-body.json"
        body_file.write_bytes(body)
        for name, app in (("bare ASGI", "app"), ("bare Starlette", "starlette_app")):
            server = stack.enter_context(bare(app, body_file))
            targets[name] = (server, server.base + status_path(str(uuid.UUID(int=0))))
        tool = "wrk" if shutil.which("wrk") else "httpx"
        print(
            f"status polls/s ({tool}, {args.concurrency} connections, {args.seconds:g} s each after a 1 s "
            f"warm-up, {args.rounds} rounds, median; body {len(body)} bytes everywhere):"
        )
        for _, url in targets.values():  # warm-up: thread pools grow, caches fill, code paths get hot
            poll_throughput(url, 1, args.concurrency)
        rates: dict[str, list[float]] = {name: [] for name in targets}
        for _ in range(args.rounds):
            for name, (_, url) in targets.items():
                rates[name].append(poll_throughput(url, args.seconds, args.concurrency))
        medians = {name: statistics.median(values) for name, values in rates.items()}
        for name, values in rates.items():
            rounds = ", ".join(f"{value:.0f}" for value in values)
            print(f"  {name}: {medians[name]:.0f}/s  (rounds: {rounds})")
        for name in nodes:
            node = medians[name]
            print(
                f"  ratio {name}: {node / medians['bare Starlette']:.2f} of bare Starlette, "
                f"{node / medians['bare ASGI']:.2f} of bare ASGI"
            )
        if args.profile:
            for kind in kinds:
                server, url = targets[f"{kind.name} node"]
                profile(kind.name, server, url, Path(args.profile), args)


def profile(name: str, server: Server, url: str, folder: Path, args: argparse.Namespace) -> None:
    """Sample a node with py-spy while wrk polls it (not in the table: the sampler takes CPU): first
    only the thread holding the GIL (where the CPU time of Python goes), then every thread (waits too).
    Raw (collapsed) stacks go to `folder`; each sample is put in one bucket (see BUCKETS) and the
    buckets printed, per request for the GIL view."""
    folder.mkdir(parents=True, exist_ok=True)
    # A ladder first: what each layer of a status poll costs, as polls/s of routes that stop earlier.
    ladder = (
        ("an unknown route (middleware and routing, answered 404)", "/no-such-route"),
        ("/health (a sync handler: one threadpool hop, no store)", "/health"),
        ("status of an unknown request (hop + summary read, 404)", status_path(str(uuid.UUID(int=0)))),
        ("status of the queued request (hop + summary + queue_position)", url.removeprefix(server.base)),
    )
    for label, path in ladder:
        rate = poll_throughput(server.base + path, args.seconds, args.concurrency, expect_ok=False)
        print(f"# {name} node, {label}: {rate:.0f}/s")
    rate_hz, seconds = 250, args.seconds + 1
    for view, flags in (("gil", ["--threads", "--gil"]), ("threads", ["--threads"])):
        out = folder / f"{name.lower()}-{view}.txt"
        command = [PY_SPY, "record", "-p", str(server.pid), "-d", f"{seconds:g}", "-r", str(rate_hz)]
        sampler = subprocess.Popen(
            [*command, "-f", "raw", "-o", str(out), "--nonblocking", *flags],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        rate = poll_throughput(url, args.seconds, args.concurrency)
        sampler.wait(60)
        counts = bucket_samples(out)
        total = sum(counts.values())
        if view == "gil":
            # GIL-held seconds, all of them while wrk ran (the node idles before and after it).
            held = total / rate_hz
            print(
                f"# {name} node under py-spy, GIL holder only: {rate:.0f}/s; the GIL was held "
                f"{held / args.seconds * 100:.0f}% of the time, {held / (rate * args.seconds) * 1e6:.0f} µs "
                f"a request; stacks in {out}"
            )
        else:
            print(f"# {name} node under py-spy, every thread: {rate:.0f}/s; stacks in {out}")
        for bucket, samples in counts.most_common():
            print(f"#   {samples / total * 100:5.1f}%  {bucket}")


# Where a sample's time goes: the first pattern found, from the innermost frame out (a store call wins
# wherever it is on the stack).
BUCKETS = (
    (("psycopg", "sqlite3"), "store: driver frames (the store method cut off the sampled stack)"),
    (("anyio/", "threading.py", "queue.py", "call_soon_threadsafe", "_write_to_self", "_read_from_self"),
     "threadpool hop (anyio, thread hand-offs and wake-ups)"),
    (("kontextd/api/wire.py",), "status body (kontextd/api/wire.py)"),
    (("json/", "render ("), "JSON rendering"),
    (("fastapi/dependencies", "fastapi/security", "kontextd/api/auth.py", "kontextd/api/deps.py"),
     "FastAPI dependency resolution"),
    (("responses.py", "RequestResponseCycle.send", "_send ("), "response start/body send"),
    (("routing.py",), "routing and endpoint call (FastAPI/Starlette)"),
    (("middleware", "_exception_handler", "telemetry", "applications.py"), "middleware stack"),
    (("h11",), "HTTP parsing (h11)"),
    (("asyncio/", "selectors.py"), "event loop, sockets"),
)  # fmt: skip


def bucket_of(frames: Sequence[str]) -> str:
    store = [frame for frame in frames if "kontextd/jobs/" in frame]
    if store:
        return "store: " + store[0].split(" (")[0]  # the outermost store method
    for frame in reversed(frames):
        for patterns, bucket in BUCKETS:
            if any(pattern in frame for pattern in patterns):
                return bucket
    return "other"


def bucket_samples(path: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if stack:
            counts[bucket_of(stack.split(";")[1:])] += int(samples)
    return counts


def dispatch_delay(kind: StoreKind, root: Path) -> None:
    """Submit to an idle worker, one at a time, then read when the worker started each."""
    with kind.fresh(root) as fresh:
        with (
            kontextd(fresh.data_dir, 1, fresh.store_url) as server,
            httpx.Client(base_url=server.base, timeout=60) as client,
        ):
            ids = []
            for _ in range(30):
                envelope = submit(client)
                ids.append(envelope["request_id"])
                while client.get(envelope["status_url"]).json()["status"] != "COMPLETED":
                    time.sleep(0.02)
        store = fresh.open()
        try:
            delays = []
            for request_id in ids:
                job = store.get(request_id)
                assert job is not None and job.started_at is not None
                delays.append(job.started_at - job.created_at)
        finally:
            store.close()
    print(f"{kind.name}: dispatch delay, submit to start on an idle worker ({len(delays)}): ", end="")
    print(percentiles(delays))


def depth(kind: StoreKind, root: Path, queued: int, samples: int) -> None:
    """Status latency over HTTP for the head and the tail of a queue of 10 and one of `queued`."""
    latencies: dict[tuple[int, str], float] = {}
    for count in (10, queued):
        with kind.fresh(root) as fresh:
            store = fresh.open()
            try:
                started = time.perf_counter()
                ids = prefill(store, count)
                filled = time.perf_counter() - started
            finally:
                store.close()
            if count == queued:
                print(f"{kind.name}: (queued {count} requests through submit in {filled:.1f} s, "
                      f"{count / filled:.0f}/s, a commit per 1000)")  # fmt: skip
            # UNCACHED: the store's read at that depth, not the poll cache answering from memory.
            node = kontextd(fresh.data_dir, 0, fresh.store_url, *UNCACHED)
            with node as server, httpx.Client(timeout=30) as client:
                for where, request_id in (("head", ids[0]), ("tail", ids[-1])):
                    url = server.base + status_path(request_id)
                    body = client.get(url).json()
                    timed_gets(client, url, 50)  # warm: the first reads of a fresh process pay for caches
                    times = timed_gets(client, url, samples)
                    latencies[(count, where)] = statistics.median(times)
                    print(
                        f"{kind.name}: status of the {where} of {count} queued (position "
                        f"{body['queue_position']}): {percentiles(times)}"
                    )
    for where in ("head", "tail"):
        ratio = latencies[(queued, where)] / latencies[(10, where)]
        print(f"{kind.name}: status latency ratio ({where}), {queued} vs 10 queued: {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--queued", type=int, default=100_000, help="queue depth for the deep-queue status test"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each throughput run")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent connections (wrk -c)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput runs per server, interleaved")
    parser.add_argument("--samples", type=int, default=500, help="status requests timed per depth and end")
    parser.add_argument(
        "--store",
        action="append",
        help="sqlite, postgres, or a postgresql:// URL; repeatable (default sqlite)",
    )
    parser.add_argument("--pg-admin", default=ADMIN_DSN, help="where `--store postgres` makes its database")
    parser.add_argument("--skip", action="append", default=[], choices=PHASES, help="leave a phase out")
    parser.add_argument("--profile", metavar="DIR", help="also sample each node with py-spy under wrk load")
    args = parser.parse_args()
    print(
        f"# kontextd server overhead — {time.strftime('%Y-%m-%d')} — {platform.node()}, {machine()}\n"
        f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}"
    )
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        kinds = []
        for spec in args.store or ["sqlite"]:
            if spec == "sqlite":
                kinds.append(StoreKind("SQLite"))
                continue
            database = stack.enter_context(throwaway_database(args.pg_admin)) if spec == "postgres" else spec
            print(
                f"# PostgreSQL {postgres_version(database)}"
                + (" (throwaway database)" if spec == "postgres" else "")
            )
            kinds.append(StoreKind("PostgreSQL", database))
        if "submit" not in args.skip:
            for kind in kinds:
                submit_latency(kind, root)
        if "polls" not in args.skip:
            poll_table(kinds, root, args)
        if "dispatch" not in args.skip:
            for kind in kinds:
                dispatch_delay(kind, root)
        if "depth" not in args.skip:
            for kind in kinds:
                depth(kind, root, args.queued, args.samples)


if __name__ == "__main__":
    main()
