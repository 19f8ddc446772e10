"""PostgreSQL for the tests: a fresh, empty schema per test on the machine's server, and a private cluster a
test may stop and start again.

The machine's server (127.0.0.1:5432, user postgres, trust auth; KONTEXTD_TEST_POSTGRES names another, as
a libpq DSN or URL) gets one database per test session, dropped at its end, so concurrent test runs never
meet; each test gets a new schema in it, reached through the DSN's `options=-csearch_path=...`. Measured
here: a schema costs about 4 ms to create and drop, a database about 120 ms (CREATE DATABASE copies a
template, DROP DATABASE forces a checkpoint), and the suite opens some hundred of them. The stores name no
schema, so a schema is as good as an empty database to them; what a database has for all its schemas
(advisory locks, NOTIFY channels) is only ever used by one test at a time within a session.

Tests skip when no server answers. `pg_cluster` runs a server of the test's own with the machine's
binaries (`/usr/lib/postgresql/*/bin`), on a free loopback port, its socket in its own directory.
"""

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bench import scratch_postgres
from bench.scratch_postgres import fresh_schema, throwaway_database

ADMIN_DSN = os.environ.get("KONTEXTD_TEST_POSTGRES", scratch_postgres.ADMIN_DSN)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """This session's own database on the machine's PostgreSQL, as a URL; skips the test when none answers."""
    try:
        psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=3).close()
    except psycopg.OperationalError as error:
        pytest.skip(f"no PostgreSQL for the tests ({ADMIN_DSN}): {str(error).strip().splitlines()[0]}")
    with throwaway_database(ADMIN_DSN, prefix=f"kontextd_test_{os.getpid()}") as url:
        yield url


@pytest.fixture
def pg_dsn(pg_server: str) -> Iterator[str]:
    """A URL whose connections see a fresh, empty schema of this test's own (dropped afterwards)."""
    with fresh_schema(pg_server, prefix="test") as url:
        yield url


def _postgres_bin() -> Path | None:
    """The newest installed server's binaries (Debian's layout), or those on PATH."""
    found = sorted(
        (Path(path).parent for path in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1]
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PrivateCluster:
    """A PostgreSQL server of one test's own, in a directory of its own, on a free loopback port.

    initdb and the server refuse to run as root: as root, everything runs as the `postgres` user (runuser),
    in a directory made under /tmp and handed to that user (pytest's tmp_path is not reachable by it).
    fsync is off: the tests stop the server, they do not pull the plug on the machine, and an `immediate`
    stop still leaves the server crash recovery to do on its next start.
    """

    def __init__(self) -> None:
        binaries = _postgres_bin()
        if binaries is None:
            pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
        self._bin = binaries
        self._as_postgres: list[str] = []
        self.root = Path(tempfile.mkdtemp(prefix="kontextd-pg-"))
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no postgres user to run the server as")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._as_postgres = ["runuser", "-u", "postgres", "--"]
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.root}'\n"
                "fsync = off\nfull_page_writes = off\nmax_connections = 40\nshared_buffers = 16MB\n"
            )
        self.running = False

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str) -> None:
        command = [*self._as_postgres, str(self._bin / program), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stderr[-2000:]}\n{log}")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """`fast`: sessions are ended cleanly and the server shuts down; `immediate`: as a crash would."""
        assert mode in ("smart", "fast", "immediate")
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")
        self.running = False

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def wait_until_accepting(self, seconds: float = 15.0) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                psycopg.connect(self.dsn, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def destroy(self) -> None:
        if self.running:
            with contextlib.suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def pg_cluster() -> Iterator[PrivateCluster]:
    """A started private PostgreSQL server, removed after the test."""
    cluster = PrivateCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()
