"""Coordination efficiency: real workers on a shared job store, with a backend that only sleeps.

    .venv/bin/python bench/coordination.py           # 32 workers: PostgreSQL (threads, processes), SQLite
    .venv/bin/python bench/coordination.py --quick   # 8 workers, a few seconds: proves it runs
    .venv/bin/python bench/coordination.py --store postgresql://user@127.0.0.1/db --modes pg-processes

Every worker is a real `kontextd.worker.runner.Worker` (claim, cancel check, input validation, generate,
encode, store the image, complete) on a real store; only the backend is fake: its generate() sleeps a
fixed D seconds and returns an 8x8 image. Once every job is queued, the workers start together; the run
lasts from the first claim to the last completion. With W workers the ideal throughput is W/D per
second, and efficiency = measured / ideal = N·D / (W · wall): what the store, the worker loop and the
machine cost on top of the backend's own time.

Modes (one row each, side by side):

- `pg-threads`: `--nodes` PostgresJobStore instances (each its own connection pool, like separate nodes)
  in this process, the workers spread over them, one thread each: every worker shares one GIL.
- `pg-processes`: `--nodes` processes, each with its own PostgresJobStore and its share of the workers
  as threads: what `kontextd worker` processes on several machines do, minus the network.
- `sqlite`: one SQLiteJobStore (the embedded store is one process's) with every worker as a thread.

PostgreSQL: without --store, a throwaway database `kontextd_bench_<random>` is made on --pg-admin (the
machine's server, 127.0.0.1:5432, user postgres) and dropped at the end; each run gets a fresh schema
in it (with --store, in that database, dropped after the run).

`--jitter 0.1` makes each sleep D·(1 ± 10 %) (uniform) so the workers stop finishing in lockstep;
`--storage null` stores nothing. The CPU column is the whole machine's (PostgreSQL included) while
the workers ran.

Afterwards every job is checked to have completed exactly once: one row each, COMPLETED with status 200,
one attempt each, generated once each (the backend counts request ids), and every complete() accepted.
"""

import argparse
import contextlib
import logging
import math
import multiprocessing
import os
import platform
import queue
import random
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.*, when run as a script

from bench.scratch_postgres import ADMIN_DSN, fresh_schema, throwaway_database
from kontextd.backends.base import Generated, GenerationJob, Progress
from kontextd.jobs.model import Job, NewJob, Outcome
from kontextd.jobs.postgres import PostgresJobStore
from kontextd.jobs.sqlite import SQLiteJobStore
from kontextd.jobs.store import JobStore
from kontextd.storage.base import Storage, StoredFile
from kontextd.storage.local import LocalStorage
from kontextd.worker.runner import Worker

APP = "fal-ai/flux-pro/kontext/text-to-image"
PROMPT_PREFIX = "coordination "  # the prompt carries the request id, so the backend can count runs
MODES = ("pg-threads", "pg-processes", "sqlite")
LEASE_SECONDS = 60.0


def postgres_version(url: str) -> str:
    with psycopg.connect(url, connect_timeout=5) as connection:
        row = connection.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


# -- what the workers run on -----------------------------------------------------------------------


SAMPLES = ("claims", "gaps", "before", "after", "sleeps", "spans", "ends")  # what a Recorder exports
COUNTERS = ("generated", "per_worker")
COUNTS = ("empty_claims", "accepted", "refused")
EXPORTED = (*SAMPLES, *COUNTERS, *COUNTS, "first_claim", "last_complete")


class Recorder:
    """Timings and counts of one process's workers (thread-safe). Times are time.monotonic(), which on
    Linux is one clock for every process, so several processes' recordings can be merged."""

    def __init__(self, target: int, on_complete: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._target = target
        self._on_complete = on_complete
        self.done = threading.Event()  # every job of this process's count completed (thread mode)
        self.claims: list[float] = []  # seconds inside claim(), for claims that returned a job
        self.empty_claims = 0
        self.gaps: list[float] = []  # a worker's complete() returned -> its next generate() started
        self.before: list[float] = []  # claim() started -> generate() started, the same job
        self.after: list[float] = []  # generate() returned -> complete() returned, the same job
        self.sleeps: list[float] = []  # generate() started -> returned: D plus the sleep's overshoot
        self.spans: list[tuple[float, float]] = []  # per worker thread: its first generate(), last complete()
        self.ends: list[float] = []  # when each accepted complete() returned
        self.generated: Counter[str] = Counter()
        self.per_worker: Counter[str] = Counter()
        self.accepted = 0  # complete() calls that returned True
        self.refused = 0  # ... and False (the job was not this worker's any more)
        self.first_claim = math.inf
        self.last_complete = -math.inf
        self._claim_started: dict[int, float] = {}
        self._generate_ended: dict[int, float] = {}
        self._last_end: dict[int, float] = {}
        self._generate_started: dict[int, float] = {}
        self._span: dict[int, list[float]] = {}

    def claim_started(self) -> float:
        started = time.monotonic()
        with self._lock:
            self.first_claim = min(self.first_claim, started)
        return started

    def claimed(self, started: float, worker_id: str, got_one: bool) -> None:
        seconds = time.monotonic() - started
        with self._lock:
            if got_one:
                self.claims.append(seconds)
                self.per_worker[worker_id] += 1
                self._claim_started[threading.get_ident()] = started
            else:
                self.empty_claims += 1

    def generating(self, request_id: str) -> None:
        now, thread = time.monotonic(), threading.get_ident()
        with self._lock:
            self.generated[request_id] += 1
            self._generate_started[thread] = now
            self._span.setdefault(thread, [now, now])
            if thread in self._claim_started:
                self.before.append(now - self._claim_started.pop(thread))
            if thread in self._last_end:
                self.gaps.append(now - self._last_end.pop(thread))

    def generated_one(self) -> None:
        now, thread = time.monotonic(), threading.get_ident()
        with self._lock:
            self._generate_ended[thread] = now
            if thread in self._generate_started:
                self.sleeps.append(now - self._generate_started.pop(thread))

    def completed(self, accepted: bool) -> None:
        now, thread = time.monotonic(), threading.get_ident()
        with self._lock:
            self._last_end[thread] = now
            if thread in self._generate_ended:
                self.after.append(now - self._generate_ended.pop(thread))
            if not accepted:
                self.refused += 1
                return
            self.accepted += 1
            self.ends.append(now)
            if thread in self._span:
                self._span[thread][1] = now
            self.last_complete = max(self.last_complete, now)
            if self.accepted >= self._target:
                self.done.set()
        if self._on_complete is not None:
            self._on_complete()

    def export(self) -> dict[str, Any]:
        with self._lock:
            self.spans = [(first, last) for first, last in self._span.values()]
            return {name: getattr(self, name) for name in EXPORTED}


class TimedStore:
    """The store as the worker sees it, with claim() and complete() timed; everything else passes through."""

    def __init__(self, store: JobStore, recorder: Recorder) -> None:
        self._store = store
        self._recorder = recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def claim(
        self,
        worker_id: str,
        lease_seconds: float,
        now: float,
        lane: str = "local",
        prefer: Collection[str] = (),
    ) -> Job | None:
        started = self._recorder.claim_started()
        job = self._store.claim(worker_id, lease_seconds, now, lane, prefer)
        self._recorder.claimed(started, worker_id, job is not None)
        return job

    def complete(self, request_id: str, outcome: Outcome, now: float, worker_id: str | None = None) -> bool:
        accepted = self._store.complete(request_id, outcome, now, worker_id)
        self._recorder.completed(accepted and outcome.ok)
        return accepted


class SleepBackend:
    """A backend with a fixed cost: generate() sleeps `seconds` (releasing the GIL, as CUDA work does)."""

    name = "sleep"

    def __init__(self, seconds: float, recorder: Recorder, jitter: float = 0.0) -> None:
        self._seconds = seconds
        self._jitter = jitter  # each sleep is D·(1 ± up to jitter), uniformly: D on average
        self._recorder = recorder

    def generate(self, job: GenerationJob, progress: Progress) -> Generated:
        self._recorder.generating(job.prompt.removeprefix(PROMPT_PREFIX))
        time.sleep(self._seconds * (1 + random.uniform(-self._jitter, self._jitter)))
        self._recorder.generated_one()
        return Generated([Image.new("RGB", (8, 8), "white")], [False], self._seconds, "sleep")


class NullStorage:
    """A Storage that keeps nothing: takes the file store's fsyncs out of the figure (`--storage null`)."""

    def put(self, key: str, data: bytes, content_type: str) -> None:
        pass

    def open(self, key: str) -> StoredFile | None:
        return None

    def delete(self, keys: Iterable[str]) -> None:
        pass

    def check(self) -> None:
        pass

    def presigned_url(self, key: str, expires_in: float) -> str | None:
        return None

    def close(self) -> None:
        pass


def make_storage(kind: str, root: Path) -> Storage:
    return LocalStorage(root) if kind == "local" else NullStorage()


def no_image(url: str) -> Image.Image:
    raise AssertionError("text-to-image: no input image to load")


def start_workers(
    stores: Sequence[JobStore],
    per_store: int,
    recorder: Recorder,
    seconds: float,
    storage: Storage,
    stop: threading.Event,
    prefix: str,
    jitter: float = 0.0,
) -> list[tuple[Worker, threading.Thread]]:
    backend = SleepBackend(seconds, recorder, jitter)
    started = []
    for node, store in enumerate(stores):
        timed = TimedStore(store, recorder)
        for index in range(per_store):
            worker = Worker(
                worker_id=f"{prefix}{node}-w{index}",
                store=timed,  # type: ignore[arg-type]
                backend=backend,
                storage=storage,
                load_image=no_image,
                notify=lambda request_id: None,
                lease_seconds=LEASE_SECONDS,
            )
            thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
            started.append((worker, thread))
    for _, thread in started:
        thread.start()
    return started


def stop_workers(started: Sequence[tuple[Worker, threading.Thread]], stop: threading.Event) -> None:
    stop.set()
    for worker, _ in started:
        worker.wake.set()
    for _, thread in started:
        thread.join(30)


def _node_process(
    dsn: str,
    node: int,
    workers: int,
    seconds: float,
    jitter: float,
    storage_kind: str,
    storage_root: str,
    barrier: Any,
    stop: Any,
    completed: Any,
    results: Any,
) -> None:
    """One node of pg-processes: its own store, its share of the workers as threads."""
    logging.basicConfig(level=logging.WARNING)
    store = PostgresJobStore(dsn)

    def count() -> None:
        with completed.get_lock():
            completed.value += 1

    recorder = Recorder(target=sys.maxsize, on_complete=count)
    storage = make_storage(storage_kind, Path(storage_root))
    threads_stop = threading.Event()
    try:
        barrier.wait(120)
        started = start_workers(
            [store], workers, recorder, seconds, storage, threads_stop, f"p{node}-", jitter
        )
        stop.wait()
        stop_workers(started, threads_stop)
        results.put(recorder.export())
    finally:
        store.close()


# -- one run ---------------------------------------------------------------------------------------


@dataclass
class Config:
    workers: int
    nodes: int
    jobs: int
    seconds: float
    storage: str
    timeout: float
    jitter: float = 0.0


@dataclass
class Result:
    mode: str
    wall: float
    recorded: dict[str, Any]
    checks: dict[str, Any]
    submit_seconds: float
    cpu_busy: float  # the machine's CPUs, busy share while the workers ran (every process, PostgreSQL too)

    def efficiency(self, config: Config) -> float:
        return config.jobs * config.seconds / (config.workers * self.wall)

    def steady_efficiency(self, config: Config) -> float:
        """Completions per second / ideal in the middle of the run, leaving out the start (every worker
        claiming at once) and the end (the last round: some workers are done a job before others): from
        the first claim + 2·D to the last completion - 2·D. NaN when the run is too short for that."""
        start = self.recorded["first_claim"] + 2 * config.seconds
        end = self.recorded["last_complete"] - 2 * config.seconds
        if end - start < 4 * config.seconds:
            return math.nan
        done = sum(1 for moment in self.recorded["ends"] if start <= moment < end)
        return done / (end - start) / (config.workers / config.seconds)


def submit_all(store: JobStore, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        request_id = str(uuid.uuid4())
        store.submit(
            NewJob(request_id, str(uuid.uuid4()), APP, "bench", {"prompt": PROMPT_PREFIX + request_id})
        )
        ids.append(request_id)
    return ids


def merge(recordings: Iterable[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {name: [] for name in SAMPLES}
    merged |= {name: Counter() for name in COUNTERS} | {name: 0 for name in COUNTS}
    merged |= {"first_claim": math.inf, "last_complete": -math.inf}
    for recording in recordings:
        for name in SAMPLES:
            merged[name].extend(recording[name])
        for name in COUNTERS:
            merged[name].update(recording[name])
        for name in COUNTS:
            merged[name] += recording[name]
        merged["first_claim"] = min(merged["first_claim"], recording["first_claim"])
        merged["last_complete"] = max(merged["last_complete"], recording["last_complete"])
    return merged


def check_rows(rows: tuple[Any, ...], ids: list[str], recorded: dict[str, Any]) -> dict[str, Any]:
    total, completed, attempts, max_attempts, ok = (int(value or 0) for value in rows)
    generated: Counter[str] = recorded["generated"]
    checks = {
        "rows": total,
        "completed_200": ok,
        "attempts": attempts,
        "max_attempts": max_attempts,
        "generated_once": sum(1 for request_id in ids if generated[request_id] == 1),
        "generated_extra": sum(generated.values()) - len(ids),
        "accepted": recorded["accepted"],
        "refused": recorded["refused"],
    }
    checks["exactly_once"] = (
        total == completed == ok == attempts == len(ids)
        and max_attempts == 1
        and checks["generated_once"] == len(ids)
        and checks["generated_extra"] == 0
        and recorded["accepted"] == len(ids)
        and recorded["refused"] == 0
    )
    return checks


def run_threads(
    mode: str, config: Config, stores: Sequence[JobStore], rows: Callable[[], tuple[Any, ...]]
) -> Result:
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        ids = submit_all(stores[0], config.jobs)
        submit_seconds = time.perf_counter() - started
        recorder = Recorder(target=config.jobs)
        stop = threading.Event()
        per_store = config.workers // len(stores)
        workers = start_workers(
            stores,
            per_store,
            recorder,
            config.seconds,
            make_storage(config.storage, Path(scratch)),
            stop,
            "n",
            config.jitter,
        )
        cpu = cpu_ticks()
        finished = recorder.done.wait(config.timeout)
        cpu_busy = busy_share(cpu, cpu_ticks())
        stop_workers(workers, stop)
        if not finished:
            raise RuntimeError(f"{mode}: only {recorder.accepted} of {config.jobs} jobs completed in time")
        recorded = recorder.export()
    wall = recorded["last_complete"] - recorded["first_claim"]
    return Result(mode, wall, recorded, check_rows(rows(), ids, recorded), submit_seconds, cpu_busy)


PG_ROWS = (
    "SELECT count(*), count(*) FILTER (WHERE state = 'COMPLETED'), sum(attempts), max(attempts),"
    " count(*) FILTER (WHERE state = 'COMPLETED' AND (outcome_json::json->>'status_code')::int = 200)"
    " FROM kontextd_jobs"
)
SQLITE_ROWS = (
    "SELECT count(*), sum(state = 'COMPLETED'), sum(attempts), max(attempts),"
    " sum(state = 'COMPLETED' AND json_extract(outcome_json, '$.status_code') = 200) FROM jobs"
)


def pg_rows(dsn: str) -> Callable[[], tuple[Any, ...]]:
    def read() -> tuple[Any, ...]:
        with psycopg.connect(dsn) as connection:
            row = connection.execute(PG_ROWS).fetchone()
        assert row is not None
        return tuple(row)

    return read


def run_pg_threads(config: Config, dsn: str) -> Result:
    stores = [PostgresJobStore(dsn) for _ in range(config.nodes)]
    try:
        return run_threads("pg-threads", config, stores, pg_rows(dsn))
    finally:
        for store in stores:
            store.close()


def run_sqlite(config: Config) -> Result:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "jobs.sqlite3"
        store = SQLiteJobStore(path)

        def rows() -> tuple[Any, ...]:
            with contextlib.closing(sqlite3.connect(path)) as connection:
                return tuple(connection.execute(SQLITE_ROWS).fetchone())

        try:
            return run_threads("sqlite", config, [store], rows)
        finally:
            store.close()


def run_pg_processes(config: Config, dsn: str) -> Result:
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no pool or thread is forked
    barrier = context.Barrier(config.nodes + 1)
    stop, completed, results = context.Event(), context.Value("i", 0), context.Queue()
    store = PostgresJobStore(dsn)  # migrates the schema before the nodes start
    started = time.perf_counter()
    try:
        ids = submit_all(store, config.jobs)
    finally:
        store.close()
    submit_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as scratch:
        processes = [
            context.Process(
                target=_node_process,
                args=(
                    dsn,
                    node,
                    config.workers // config.nodes,
                    config.seconds,
                    config.jitter,
                    config.storage,
                    scratch,
                    barrier,
                    stop,
                    completed,
                    results,
                ),
            )
            for node in range(config.nodes)
        ]
        for process in processes:
            process.start()
        recordings = []
        try:
            barrier.wait(120)
            cpu = cpu_ticks()
            deadline = time.monotonic() + config.timeout
            while completed.value < config.jobs and time.monotonic() < deadline:
                time.sleep(0.01)
            cpu_busy = busy_share(cpu, cpu_ticks())
            stop.set()
            for _ in processes:
                recordings.append(results.get(timeout=60))
        except (queue.Empty, threading.BrokenBarrierError) as error:
            raise RuntimeError(f"pg-processes: a node did not report ({error!r})") from error
        finally:
            stop.set()
            for process in processes:
                process.join(30)
                if process.is_alive():
                    process.kill()
    recorded = merge(recordings)
    if recorded["accepted"] < config.jobs:
        raise RuntimeError(
            f"pg-processes: only {recorded['accepted']} of {config.jobs} jobs completed in time"
        )
    wall = recorded["last_complete"] - recorded["first_claim"]
    checks = check_rows(pg_rows(dsn)(), ids, recorded)
    return Result("pg-processes", wall, recorded, checks, submit_seconds, cpu_busy)


# -- reporting -------------------------------------------------------------------------------------


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of every CPU, from /proc/stat; (0, 0) where there is none."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else math.nan


def percentile(samples: Sequence[float], fraction: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def ms(samples: Sequence[float]) -> str:
    return f"{percentile(samples, 0.5) * 1000:.2f} / {percentile(samples, 0.99) * 1000:.2f}"


def report(results: Sequence[Result], config: Config) -> None:
    ideal = config.workers / config.seconds
    print(
        f"\n{config.workers} workers, {config.jobs} jobs, D = {config.seconds:g} s"
        + (f" ± {config.jitter:.0%} (uniform)" if config.jitter else "")
        + ", "
        f"storage {config.storage}: ideal {ideal:.1f} jobs/s, "
        f"ideal wall {config.jobs * config.seconds / config.workers:.2f} s"
    )
    header = (
        "| mode | wall s | jobs/s | efficiency | steady-state efficiency | claim p50/p99 ms | gap p50/p99 ms"
        " | claim→generate p50/p99 ms | generate→complete p50/p99 ms | jobs/worker min-max | CPU busy"
        " | exactly once |"
    )
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for result in results:
        recorded, checks = result.recorded, result.checks
        per_worker = recorded["per_worker"].values()
        print(
            f"| {result.mode} | {result.wall:.2f} | {config.jobs / result.wall:.1f} | "
            f"{result.efficiency(config):.3f} | {result.steady_efficiency(config):.3f} | "
            f"{ms(recorded['claims'])} | {ms(recorded['gaps'])} | "
            f"{ms(recorded['before'])} | {ms(recorded['after'])} | {min(per_worker)}-{max(per_worker)} | "
            f"{result.cpu_busy * 100:.0f} % | "
            f"{'yes' if checks['exactly_once'] else 'NO'} |"
        )
    print(
        "\nWhere the workers' time goes beyond D, per job, mean ms (the terms add up to the lost time: "
        "W·wall = N·D + each term · N)"
    )
    header = (
        "| mode | lost | sleep overshoot | gap complete→next generate | (inside claims, all of them)"
        " | generate→complete | before the first job | idle after the last job |"
    )
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for result in results:
        recorded, jobs = result.recorded, config.jobs
        start, end = recorded["first_claim"], recorded["last_complete"]
        lost = (config.workers * result.wall - jobs * config.seconds) / jobs
        terms = (
            sum(recorded["sleeps"]) - jobs * config.seconds,
            sum(recorded["gaps"]),
            sum(recorded["claims"]),
            sum(recorded["after"]),
            sum(first - start for first, _ in recorded["spans"]),
            sum(end - last for _, last in recorded["spans"]),
        )
        print(
            f"| {result.mode} | {lost * 1000:.2f} | "
            + " | ".join(f"{term / jobs * 1000:.2f}" for term in terms)
            + " |"
        )
    for result in results:
        checks = result.checks
        print(
            f"# {result.mode}: queued {config.jobs} in {result.submit_seconds:.2f} s; rows {checks['rows']}, "
            f"completed with 200 {checks['completed_200']}, attempts {checks['attempts']} (max "
            f"{checks['max_attempts']}), generated once {checks['generated_once']} (extra runs "
            f"{checks['generated_extra']}), complete() accepted {checks['accepted']} refused "
            f"{checks['refused']}, empty claims {result.recorded['empty_claims']}"
        )
    if len(results) > 1:
        base = results[0]
        ratios = ", ".join(
            f"{result.mode} {result.efficiency(config) / base.efficiency(config):.2f}"
            for result in results[1:]
        )
        print(f"# efficiency relative to {base.mode}: {ratios}")


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}"


def main(argv: Sequence[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument(
        "--nodes", type=int, default=4, help="store instances (pg-threads) or processes (pg-processes)"
    )
    parser.add_argument("--jobs-per-worker", type=int, default=25)
    parser.add_argument("--seconds", type=float, default=0.2, help="D: what one generate() sleeps")
    parser.add_argument(
        "--storage",
        choices=("local", "null"),
        default="local",
        help="LocalStorage in a temp dir (fsyncs each image) or none",
    )
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument(
        "--store", help="a postgresql:// database to run in (a schema per run); default: a throwaway database"
    )
    parser.add_argument("--pg-admin", default=ADMIN_DSN, help="where the throwaway database is made")
    parser.add_argument(
        "--jitter",
        type=float,
        default=0.0,
        help="each sleep is D·(1 ± up to this), uniformly (default 0: fixed)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a run may take")
    parser.add_argument("--quick", action="store_true", help="8 workers on 2 nodes, 5 jobs each, D = 0.05 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.workers, args.nodes, args.jobs_per_worker, args.seconds = 8, 2, 5, 0.05
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")
    if args.workers % args.nodes:
        parser.error("--workers must be a multiple of --nodes")
    config = Config(
        args.workers,
        args.nodes,
        args.workers * args.jobs_per_worker,
        args.seconds,
        args.storage,
        args.timeout,
        args.jitter,
    )
    logging.basicConfig(level=logging.WARNING)
    print(f"# kontextd coordination — {time.strftime('%Y-%m-%d')} — {platform.node()}, {machine()}")
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}")

    results = []
    with contextlib.ExitStack() as stack:
        database = None
        if any(mode.startswith("pg-") for mode in modes):
            database = args.store or stack.enter_context(throwaway_database(args.pg_admin))
            print(
                f"# PostgreSQL {postgres_version(database)}" + ("" if args.store else " (throwaway database)")
            )
        for mode in modes:
            if mode == "sqlite":
                results.append(run_sqlite(config))
                continue
            assert database is not None
            with fresh_schema(database) as dsn:
                run = run_pg_threads if mode == "pg-threads" else run_pg_processes
                results.append(run(config, dsn))
    report(results, config)
    return results


if __name__ == "__main__":
    main()
