"""Opening the registry database: URL, SQLite settings, migrations.

`connect()` returns a SQLAlchemy `Engine` with the migrations applied, for the URL given, else
`$LMFORGE_DB`, else `sqlite:///$LMFORGE_HOME/registry.db`. The caller owns the engine (build it
once, e.g. in the server's lifespan, and pass it in) and disposes of it.

PostgreSQL (`postgresql://user:password@host/db`, driven by psycopg 3) is for several server
replicas, or several machines, sharing one registry: the limits, budgets and the ledger are
enforced by conditional UPDATEs in the database (see `keys`), so they hold across processes on
either database. Passwords never appear in messages or logs.

SQLite the boring way: every connection runs in WAL mode with `synchronous=FULL`, foreign keys on
and a 5 s busy timeout. pysqlite's legacy transaction handling (no BEGIN before DDL or SELECT) is
switched off and SQLAlchemy emits a plain (deferred) BEGIN instead, so `engine.begin()` is a real
SQLite transaction and migrations are transactional. See "Transactions with SQLite and the sqlite3
driver" in SQLAlchemy's SQLite dialect documentation.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError

from lmforge.errors import LmforgeError
from lmforge.home import lmforge_home
from lmforge.registry.migrations import migrate

DB_ENV = "LMFORGE_DB"  # the registry's URL, when it is not the SQLite file under the home
_LOCK_WAIT_S = 5.0
_PRAGMAS = (
    "PRAGMA busy_timeout=5000",  # first, so that switching to WAL waits for other processes
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
)


def registry_url() -> str | None:
    """The registry URL `$LMFORGE_DB` names, or None for the SQLite file under the home."""
    return os.environ.get(DB_ENV) or None


def describe(url: str | URL) -> str:
    """URL as it may be shown: its password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(an invalid URL)"


def connect(url: str | None = None, *, home: Path | None = None) -> Engine:
    """Open the registry at URL, migrated to the latest schema.

    URL defaults to `$LMFORGE_DB`, then to `sqlite:///HOME/registry.db`, HOME to
    `$LMFORGE_HOME` (`~/.lmforge`); HOME is ignored when a URL is given either way. SQLite and
    PostgreSQL URLs are supported. Raises `LmforgeError` naming the database (never its
    password) when it cannot be used: not a SQLite file, a server that does not answer, …
    """
    url = url or registry_url()
    if url is None:
        sa_url = URL.create("sqlite", database=str((home or lmforge_home()) / "registry.db"))
    else:
        try:
            sa_url = make_url(url)
        except Exception as e:
            raise LmforgeError(f"registry URL {describe(url)!r} is not a database URL") from e
    backend = sa_url.get_backend_name()
    if backend == "postgresql":
        return _connect_postgresql(sa_url)
    if backend != "sqlite":
        raise LmforgeError(
            f"registry URL {describe(sa_url)!r}: only sqlite:/// and postgresql:// URLs are "
            "supported"
        )
    database = sa_url.database or ":memory:"
    if database != ":memory:" and not database.startswith("file:"):
        try:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LmforgeError(f"registry {database}: cannot create its directory: {e}") from e
    engine = create_engine(sa_url)
    event.listen(engine, "connect", _on_connect)
    event.listen(engine, "begin", _on_begin)
    try:
        migrate(engine)
    except DBAPIError as e:
        engine.dispose()
        reason = " ".join(str(e.orig).split())
        raise LmforgeError(
            f"registry {database}: cannot use it as a SQLite database: {reason}"
        ) from e
    return engine


def _connect_postgresql(sa_url: URL) -> Engine:
    if sa_url.drivername == "postgresql":
        sa_url = sa_url.set(drivername="postgresql+psycopg")
    shown = describe(sa_url)
    if sa_url.drivername != "postgresql+psycopg":
        raise LmforgeError(f"registry URL {shown!r}: use postgresql:// (driven by psycopg 3)")
    try:
        import psycopg  # noqa: F401 - only to name the missing package clearly
    except ImportError as e:
        raise LmforgeError(
            f"registry {shown}: PostgreSQL needs psycopg (pip install 'psycopg[binary]')"
        ) from e
    query = dict(sa_url.query)
    query.setdefault("connect_timeout", "10")
    engine = create_engine(sa_url.set(query=query), pool_pre_ping=True)
    try:
        migrate(engine)
    except DBAPIError as e:
        engine.dispose()
        reason = " ".join(str(e.orig).split()).replace(sa_url.password or "\0", "***")
        raise LmforgeError(f"registry {shown}: cannot use it: {reason}") from e
    return engine


@contextmanager
def read_existing(*, home: Path | None = None) -> Iterator[Connection | None]:
    """A connection for reads from the registry (see `connect`), or None when there is none yet.

    For callers that only look (model lists, name resolution): a missing registry file is an
    empty one, and looking never creates it. A registry named by `$LMFORGE_DB` is always
    opened. The engine is disposed of on exit.
    """
    if registry_url() is None and not ((home or lmforge_home()) / "registry.db").exists():
        yield None
        return
    engine = connect(home=home)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # pysqlite emits no BEGIN; _on_begin does
    cursor = dbapi_connection.cursor()
    try:
        for pragma in _PRAGMAS:
            _retry_locked(lambda: cursor.execute(pragma).fetchall())  # noqa: B023 (called now)
    finally:
        cursor.close()


def _retry_locked(run: Callable[[], object], *, seconds: float = _LOCK_WAIT_S) -> None:
    """Run RUN, retrying while SQLite says the database is locked, for up to SECONDS.

    Switching a fresh file to WAL while other processes open it can fail with SQLITE_BUSY
    without SQLite calling the busy handler (the busy timeout does not cover it), so the
    connection setup waits here instead.
    """
    deadline = time.monotonic() + seconds
    delay = 0.001
    while True:
        try:
            run()
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _on_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN")
