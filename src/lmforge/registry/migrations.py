"""Ordered, recorded schema migrations for the registry (SQLite SQL).

`MIGRATIONS` is append-only history: never edit a released migration, add the next number.
`migrate(engine)` records each applied migration in `schema_migrations` and applies the missing
ones in order, each in its own transaction: the first statement claims the number (an INSERT that
does nothing if another process already has it), so two processes migrating the same fresh file
apply each migration exactly once, and a failing migration leaves neither its tables nor its
record behind. (After simonw/llm `migrations.py`.)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, text

from lmforge.errors import LmforgeError
from lmforge.registry.tables import utc_now

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    number: int  # 1, 2, 3, … in order, never reused
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "create models",
        (
            """
            CREATE TABLE models (
                id INTEGER PRIMARY KEY,
                name TEXT NOT NULL,
                version INTEGER NOT NULL,
                path TEXT NOT NULL,
                sha256 TEXT NOT NULL,
                parent TEXT NULL,
                arch TEXT NULL,
                n_params INTEGER NULL,
                source TEXT NULL,
                created_at TEXT NOT NULL,
                UNIQUE (name, version)
            )
            """,
        ),
    ),
    Migration(
        2,
        "create datasets",
        (
            """
            CREATE TABLE datasets (
                id INTEGER PRIMARY KEY,
                name TEXT NOT NULL,
                path TEXT NOT NULL,
                content_key TEXT NOT NULL,
                manifest_sha256 TEXT NOT NULL,
                tokenizer TEXT NOT NULL,
                vocab_size INTEGER NOT NULL,
                documents INTEGER NOT NULL,
                tokens INTEGER NOT NULL,
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL,
                UNIQUE (name)
            )
            """,
        ),
    ),
)

_CREATE_SCHEMA_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    number INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TEXT NOT NULL
)
"""
_CLAIM = """
INSERT INTO schema_migrations (number, name, applied_at) VALUES (:number, :name, :applied_at)
ON CONFLICT (number) DO NOTHING
"""


def applied_migrations(engine: Engine) -> list[int]:
    """Numbers of the migrations recorded in ENGINE's database, ascending."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT number FROM schema_migrations ORDER BY number"))
        return [int(number) for (number,) in rows]


def migrate(engine: Engine, migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """Apply the MIGRATIONS that ENGINE's database lacks, in order; return their numbers."""
    with engine.begin() as conn:
        conn.exec_driver_sql(_CREATE_SCHEMA_MIGRATIONS)
    done = set(applied_migrations(engine))
    known = {m.number for m in migrations}
    if unknown := sorted(done - known):
        raise LmforgeError(
            f"registry {engine.url.database} has migration {unknown[-1]}, unknown to this "
            "lmforge (written by a newer version?)"
        )
    applied = []
    for migration in sorted(migrations, key=lambda m: m.number):
        if migration.number in done:
            continue
        with engine.begin() as conn:
            claim = {"number": migration.number, "name": migration.name, "applied_at": utc_now()}
            if conn.execute(text(_CLAIM), claim).rowcount == 0:
                continue  # another process applied it since we looked
            for statement in migration.statements:
                conn.exec_driver_sql(statement)
        log.info("registry: applied migration %d (%s)", migration.number, migration.name)
        applied.append(migration.number)
    return applied
