"""Opening the job store a deployment names by URL: the embedded SQLite file or a shared PostgreSQL."""

import re
from pathlib import Path

from kontextd.jobs.store import JobStore

_FORMS = "sqlite:///<absolute path> (one process) or postgresql://user@host:port/database (shared)"
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def open_store(url: str, poll_cache: float | None = None) -> JobStore:
    """`sqlite:///var/lib/kontextd/jobs.sqlite3` or `postgresql://…` / `postgres://…` (any libpq URL:
    user, password, host, port, database, query parameters). Raises ValueError for anything else, naming
    only the scheme: the URL may hold a password. `poll_cache`: seconds its poll cache keeps a poll
    (kontextd/jobs/poll_cache.py), None for the default."""
    match = _SCHEME.match(url)
    scheme = match.group(1).lower() if match else None
    if scheme == "sqlite":
        path = url[match.end() :] if match else ""
        if not path.startswith("/"):
            raise ValueError(f"a sqlite job store URL needs an absolute path: {_FORMS}")
        from kontextd.jobs.sqlite import SQLiteJobStore  # imported only when this kind is used

        return SQLiteJobStore(Path(path), poll_cache=poll_cache)
    if scheme in ("postgresql", "postgres"):
        from kontextd.jobs.postgres import PostgresJobStore  # psycopg is imported only when used

        return PostgresJobStore(url, poll_cache=poll_cache)
    named = f"scheme {scheme!r}" if scheme else "no scheme"
    raise ValueError(f"unsupported job store URL ({named}): use {_FORMS}")
