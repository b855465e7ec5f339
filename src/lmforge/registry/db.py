"""Opening the registry database: URL, SQLite settings, migrations.

`connect()` returns a SQLAlchemy `Engine` for `sqlite:///$LMFORGE_HOME/registry.db` (or the URL
given) with the migrations applied. The caller owns the engine (build it once, e.g. in the
server's lifespan, and pass it in) and disposes of it.

SQLite the boring way: every connection runs in WAL mode with `synchronous=FULL`, foreign keys on
and a 5 s busy timeout. pysqlite's legacy transaction handling (no BEGIN before DDL or SELECT) is
switched off and SQLAlchemy emits a plain (deferred) BEGIN instead, so `engine.begin()` is a real
SQLite transaction and migrations are transactional. See "Transactions with SQLite and the sqlite3
driver" in SQLAlchemy's SQLite dialect documentation.
"""

from __future__ import annotations

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

_LOCK_WAIT_S = 5.0
_PRAGMAS = (
    "PRAGMA busy_timeout=5000",  # first, so that switching to WAL waits for other processes
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
)


def connect(url: str | None = None, *, home: Path | None = None) -> Engine:
    """Open the registry at URL, migrated to the latest schema.

    URL defaults to `sqlite:///HOME/registry.db`, HOME to `$LMFORGE_HOME` (`~/.lmforge`); HOME is
    ignored when URL is given. Only SQLite URLs are supported so far (the migrations are written
    in SQLite's dialect). Raises `LmforgeError` naming the file when it cannot be used, e.g. when
    it is not a SQLite database.
    """
    if url is None:
        sa_url = URL.create("sqlite", database=str((home or lmforge_home()) / "registry.db"))
    else:
        sa_url = make_url(url)
    if sa_url.get_backend_name() != "sqlite":
        raise LmforgeError(f"registry URL {sa_url!r}: only sqlite:/// URLs are supported")
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


@contextmanager
def read_existing(*, home: Path | None = None) -> Iterator[Connection | None]:
    """A connection for reads from the registry under HOME, or None when there is none yet.

    For callers that only look (model lists, name resolution): a missing registry is an empty
    one, and looking never creates it. The engine is disposed of on exit.
    """
    if not ((home or lmforge_home()) / "registry.db").exists():
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
