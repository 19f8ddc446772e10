"""Scratch PostgreSQL for the tests and the benchmarks: throwaway databases and schemas, and many submits
per transaction through a store's own submit.

One module for both, so tests/pg_fixtures.py, tests/test_job_store.py and the scripts under bench/ make
and fill their scratch stores the same way. (Tests import bench/ already: the repository root is on their
path.)
"""

import contextlib
import itertools
import secrets
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from kontextd.jobs.postgres import PostgresJobStore, _Transaction
from kontextd.jobs.sql_store import Transaction
from kontextd.jobs.sqlite import SQLiteJobStore
from kontextd.jobs.store import JobStore

ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"  # the machine's server, trust auth


def postgres_url(params: dict[str, Any], dbname: str, schema: str | None = None) -> str:
    """A postgresql:// URL (what `--store` and open_store take) for `dbname` on the server `params`
    describes, its connections seeing only `schema` when given."""
    user = quote(str(params.get("user") or "postgres"), safe="")
    password = params.get("password")
    credentials = f"{user}:{quote(str(password), safe='')}" if password else user
    host, port = params.get("host") or "127.0.0.1", params.get("port") or 5432
    url = f"postgresql://{credentials}@{host}:{port}/{dbname}"
    return url + (f"?options=-csearch_path%3D{schema}" if schema else "")


@contextlib.contextmanager
def throwaway_database(admin_dsn: str = ADMIN_DSN, prefix: str = "kontextd_bench") -> Iterator[str]:
    """A new database `<prefix>_<random>` on the admin DSN's server, as a URL; dropped at the end."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield postgres_url(conninfo_to_dict(admin_dsn), name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def fresh_schema(database_url: str, prefix: str = "bench") -> Iterator[str]:
    """A new, empty schema in the database, as a URL whose connections see only it; dropped at the end
    (a store left open and busy must not hang the drop: it waits 10 s for locks at most)."""
    schema = f"{prefix}_{secrets.token_hex(6)}"
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    params = conninfo_to_dict(database_url)
    try:
        yield postgres_url(params, str(params["dbname"]), schema)
    finally:
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute("SET lock_timeout = '10s'")
            admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@contextlib.contextmanager
def bulk(store: JobStore, per_commit: int = 1000) -> Iterator[None]:
    """Many submits per transaction, one commit per `per_commit` instead of one each, through submit
    itself: tickets and positions are the store's own. Not all in one transaction: PostgreSQL keeps every
    version of a row updated over and over in one transaction (the ticket counter) until it ends, and each
    update walks them. The store's own commit steps are bypassed, its poll cache's included: poll through
    another store instance (or process) afterwards."""
    uses = itertools.count(1)
    with _held(store) as (connection, begin, handed, before_commit):

        def write() -> contextlib.AbstractContextManager[Any]:
            if next(uses) % per_commit == 0:
                before_commit()
                connection.execute("COMMIT")
                connection.execute(begin)
            return contextlib.nullcontext(handed)

        connection.execute(begin)
        with mock.patch.object(store, "_write", write):
            yield
        before_commit()
        connection.execute("COMMIT")


@contextlib.contextmanager
def _held(store: JobStore) -> Iterator[tuple[Any, str, Any, Callable[[], None]]]:
    """What bulk() needs of a store: one connection held throughout, how a write transaction begins on
    it, what the store's own `_write()` would hand its callers, and what must go out before each commit."""
    if isinstance(store, SQLiteJobStore):
        with store._pool.connection() as connection:
            yield connection, "BEGIN IMMEDIATE", Transaction(connection), lambda: None
        return
    assert isinstance(store, PostgresJobStore)
    with store._connection() as connection:
        transaction = _Transaction(connection)
        yield connection, "BEGIN", transaction, transaction.send_notifications
