"""kontextd's own overhead with the tiny backend: submit latency, dispatch delay, status-poll throughput
against a bare ASGI app, and status latency with 10 vs 100,000 queued requests.

    .venv/bin/python bench/server_overhead.py [--queued 100000] [--seconds 5]

Everything runs on loopback. Client and server share the machine, so absolute figures include the
client's own cost; the side-by-side ratios are the point.
"""

import argparse
import asyncio
import os
import platform
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import httpx

from kontextd.jobs.model import NewJob
from kontextd.jobs.sqlite import SQLiteJobStore

APP = "fal-ai/flux-pro/kontext/text-to-image"
BODY = {"prompt": "a lighthouse at dusk", "seed": 1}


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


@contextmanager
def serving(command: list[str], health_path: str) -> Iterator[str]:
    """Run a server process on a free loopback port until the block ends; yields its base URL."""
    port = free_port()
    process = subprocess.Popen(
        [part.replace("{port}", str(port)) for part in command],
        cwd=Path(__file__).parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base + health_path, process)
        yield base
    finally:
        process.terminate()
        process.wait(30)


def kontextd(data_dir: Path, workers: int) -> AbstractContextManager[str]:
    return serving(
        [
            sys.executable,
            "-m",
            "kontextd",
            "serve",
            "--port",
            "{port}",
            "--data-dir",
            str(data_dir),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
        ],
        "/health",
    )


def bare_asgi() -> AbstractContextManager[str]:
    return serving(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.bare_asgi:app",
            "--port",
            "{port}",
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        "/",
    )


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms"


def timed_gets(client: httpx.Client, url: str, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        client.get(url).raise_for_status()
        samples.append(time.perf_counter() - started)
    return samples


def poll_throughput(url: str, seconds: float, concurrency: int) -> float:
    """Requests per second, with wrk as the load generator when present (a Python client saturates first)."""
    if shutil.which("wrk"):
        output = subprocess.run(
            ["wrk", "-t2", f"-c{concurrency}", f"-d{seconds:g}s", url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    return asyncio.run(_httpx_throughput(url, seconds, concurrency))


async def _httpx_throughput(url: str, seconds: float, concurrency: int) -> float:
    done = 0
    deadline = time.monotonic() + seconds

    async def poller(client: httpx.AsyncClient) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            (await client.get(url)).raise_for_status()
            done += 1

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency), timeout=30) as client:
        await asyncio.gather(*(poller(client) for _ in range(concurrency)))
    return done / seconds


def prefill(data_dir: Path, count: int) -> str:
    """Queue `count` requests through the store's own submit; returns the last one's id."""
    store = SQLiteJobStore(data_dir / "jobs.sqlite3")
    request_id = ""
    try:
        for _ in range(count):
            request_id = str(uuid.uuid4())
            store.submit(NewJob(request_id, str(uuid.uuid4()), APP, "anonymous", BODY))
    finally:
        store.close()
    return request_id


def status_url(base: str, request_id: str) -> str:
    return f"{base}/fal-ai/flux-pro/requests/{request_id}/status"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--queued", type=int, default=100_000, help="queue depth for the deep-queue status test"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each throughput run")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent pollers")
    args = parser.parse_args()
    print(
        f"# kontextd server overhead — {time.strftime('%Y-%m-%d')} — {platform.node()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)

        # Submit latency and poll throughput with no worker, so generation does not compete for the CPU.
        with kontextd(root / "api", workers=0) as base, httpx.Client(base_url=base, timeout=30) as client:
            submits = []
            for _ in range(300):
                started = time.perf_counter()
                response = client.post(f"/{APP}", json=BODY)
                submits.append(time.perf_counter() - started)
                response.raise_for_status()
            print(f"submit latency (300 sequential): {percentiles(submits)}")
            queued_status = response.json()["status_url"]
            ours = poll_throughput(queued_status, args.seconds, args.concurrency)
        with bare_asgi() as base:
            bare = poll_throughput(base + "/", args.seconds, args.concurrency)
        print(
            f"status polls/s ({args.concurrency} connections, {'wrk' if shutil.which('wrk') else 'httpx'}): "
            f"kontextd {ours:.0f}, bare ASGI {bare:.0f}, "
            f"ratio {ours / bare:.2f}"
        )

        # Dispatch delay: submit to an idle worker, then read when the worker started it.
        with (
            kontextd(root / "dispatch", workers=1) as base,
            httpx.Client(base_url=base, timeout=60) as client,
        ):
            ids = []
            for _ in range(30):
                envelope = client.post(f"/{APP}", json=BODY).json()
                ids.append(envelope["request_id"])
                while client.get(envelope["status_url"]).json()["status"] != "COMPLETED":
                    time.sleep(0.02)
        database = sqlite3.connect(root / "dispatch" / "jobs.sqlite3")
        delays = [row[0] for row in database.execute("SELECT started_at - created_at FROM jobs")]
        database.close()
        print(f"dispatch delay, submit to start on an idle worker ({len(delays)}): {percentiles(delays)}")

        # Status latency for the last request of a short and of a deep queue.
        shallow_id = prefill(root / "shallow", 10)
        started = time.perf_counter()
        deep_id = prefill(root / "deep", args.queued)
        print(f"(queued {args.queued} requests in {time.perf_counter() - started:.1f} s)")
        latencies = {}
        for name, data_dir, request_id in (
            ("10", root / "shallow", shallow_id),
            (f"{args.queued}", root / "deep", deep_id),
        ):
            with kontextd(data_dir, workers=0) as base, httpx.Client(timeout=30) as client:
                body = client.get(status_url(base, request_id)).json()
                samples = timed_gets(client, status_url(base, request_id), 500)
                latencies[name] = statistics.median(samples)
                print(
                    f"status of the last of {name} queued (position {body['queue_position']}): "
                    f"{percentiles(samples)}"
                )
        shallow, deep = latencies.values()
        print(f"status latency ratio, {args.queued} vs 10 queued: {deep / shallow:.2f}")


if __name__ == "__main__":
    main()
