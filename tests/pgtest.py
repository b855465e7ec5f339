"""PostgreSQL for `make test-pg`: one schema per $LMFORGE_HOME on the server it names.

`make test-pg` starts a throwaway PostgreSQL cluster (`tests/pg_cluster.sh`) and runs the
registry, limits, budget and metering tests with `LMFORGE_TEST_PG` set to a database URL on it.
Every home a test uses then gets its own schema there (named after the home's path, so the
test process and the servers and commands it starts find the same one), and `$LMFORGE_DB`
points lmforge at it. Without `LMFORGE_TEST_PG` (plain `make test`) nothing here does anything.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import quote

PG_ENV = "LMFORGE_TEST_PG"


def server_url() -> str | None:
    """The postgresql:// URL of the test database, or None when the tests run on SQLite."""
    return os.environ.get(PG_ENV) or None


_created: set[str] = set()  # schemas this process made sure of (run_env asks for each command)


def schema_url(home: Path) -> str:
    """A URL for HOME's own schema on the test database (created if missing)."""
    from sqlalchemy import create_engine, text

    base = server_url()
    assert base is not None, f"{PG_ENV} is not set"
    schema = "t_" + hashlib.sha1(str(home).encode()).hexdigest()[:24]
    if schema not in _created:
        engine = create_engine(base.replace("postgresql://", "postgresql+psycopg://", 1))
        try:
            with engine.begin() as conn:  # one at a time: IF NOT EXISTS races in the catalog
                conn.execute(text("SELECT pg_advisory_xact_lock(42)"))
                conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {schema}"))
        finally:
            engine.dispose()
        _created.add(schema)
    separator = "&" if "?" in base else "?"
    return f"{base}{separator}options={quote(f'-csearch_path={schema}')}"


def env_for(home: Path) -> dict[str, str]:
    """The environment that points lmforge at HOME's registry: {} on SQLite."""
    return {"LMFORGE_DB": schema_url(home)} if server_url() else {}


def registry_url(directory: Path) -> str:
    """A registry URL of its own for a test: `DIRECTORY/registry.db`, or a schema named after
    DIRECTORY under `make test-pg`."""
    if server_url() is None:
        return f"sqlite:///{directory / 'registry.db'}"
    return schema_url(directory)


def query(home: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    """Run SQL (with `?` placeholders) on HOME's registry, SQLite or PostgreSQL; its rows."""
    if server_url() is None:
        with sqlite3.connect(home / "registry.db") as conn:
            return conn.execute(sql, args).fetchall()
    import psycopg

    with psycopg.connect(schema_url(home)) as conn:
        return [tuple(row) for row in conn.execute(sql.replace("?", "%s"), args).fetchall()]


def use_home(monkeypatch: Any, home: Path) -> None:
    """Make HOME this process's $LMFORGE_HOME, and its registry the one lmforge opens."""
    monkeypatch.setenv("LMFORGE_HOME", str(home))
    for name, value in env_for(home).items():
        monkeypatch.setenv(name, value)
