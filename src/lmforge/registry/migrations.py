"""Ordered, recorded schema migrations for the registry (SQLite SQL, translated for PostgreSQL).

`MIGRATIONS` is append-only history: never edit a released migration, add the next number.
`migrate(engine)` records each applied migration in `schema_migrations` and applies the missing
ones in order, each in its own transaction: the first statement claims the number (an INSERT that
does nothing if another process already has it), so two processes migrating the same fresh file
apply each migration exactly once, and a failing migration leaves neither its tables nor its
record behind. (After simonw/llm `migrations.py`.)

The statements are SQLite's SQL; `dialects.ddl` gives PostgreSQL the same schema in its types,
and on PostgreSQL the whole run holds an advisory lock, since there two processes creating
`schema_migrations` at once can collide in the system catalogs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, text

from lmforge.errors import LmforgeError
from lmforge.registry.dialects import (
    POSTGRESQL,
    POSTGRESQL_PRELUDE,
    AppendOnly,
    advisory_key,
    ddl,
)
from lmforge.registry.tables import utc_now

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    number: int  # 1, 2, 3, … in order, never reused
    name: str
    statements: tuple[str | AppendOnly, ...]


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
    Migration(
        3,
        "keys, limits, usage ledger, prices, audit log, moderation",
        (
            # API keys: only sha256 + a short prefix of the key are stored. The limiter's state
            # (requests and tokens in the current one-minute window, spend in the budget
            # period, open reservations) lives on the key's row, so one conditional UPDATE can
            # check and take it atomically, whichever process runs it.
            """
            CREATE TABLE api_keys (
                id INTEGER PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                prefix TEXT NOT NULL,
                key_hash TEXT NOT NULL UNIQUE,
                models TEXT NULL,
                rpm INTEGER NULL CHECK (rpm IS NULL OR rpm >= 0),
                tpm INTEGER NULL CHECK (tpm IS NULL OR tpm >= 0),
                budget_nusd INTEGER NULL CHECK (budget_nusd IS NULL OR budget_nusd >= 0),
                budget_period TEXT NOT NULL DEFAULT 'total'
                    CHECK (budget_period IN ('month', 'total')),
                expires_at TEXT NULL,
                admin INTEGER NOT NULL DEFAULT 0,
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL,
                revoked_at TEXT NULL,
                req_window REAL NOT NULL DEFAULT 0,
                req_used INTEGER NOT NULL DEFAULT 0,
                tok_window REAL NOT NULL DEFAULT 0,
                tok_used INTEGER NOT NULL DEFAULT 0,
                spend_period TEXT NOT NULL DEFAULT '',
                spent_nusd INTEGER NOT NULL DEFAULT 0,
                reserved_nusd INTEGER NOT NULL DEFAULT 0 CHECK (reserved_nusd >= 0)
            )
            """,
            "CREATE INDEX api_keys_prefix ON api_keys (prefix)",
            # What an admitted request holds until it is settled (or its reservation expires).
            """
            CREATE TABLE reservations (
                request_id TEXT PRIMARY KEY,
                key_id INTEGER NOT NULL REFERENCES api_keys (id),
                tokens INTEGER NOT NULL,
                cost_nusd INTEGER NOT NULL,
                tok_window REAL NOT NULL,
                expires REAL NOT NULL
            )
            """,
            # The usage ledger: one row per request, append-only (the triggers refuse changes).
            """
            CREATE TABLE usage (
                id INTEGER PRIMARY KEY,
                request_id TEXT NOT NULL UNIQUE,
                key_id INTEGER NULL REFERENCES api_keys (id),
                endpoint TEXT NOT NULL,
                model TEXT NULL,
                model_version TEXT NULL,
                prompt_tokens INTEGER NOT NULL DEFAULT 0,
                completion_tokens INTEGER NOT NULL DEFAULT 0,
                ttft_ms REAL NULL,
                latency_ms REAL NOT NULL,
                status TEXT NOT NULL,
                http_status INTEGER NOT NULL,
                cost_nusd INTEGER NOT NULL DEFAULT 0,
                price_input INTEGER NULL,
                price_output INTEGER NULL,
                created_at TEXT NOT NULL
            )
            """,
            "CREATE INDEX usage_created ON usage (created_at)",
            "CREATE INDEX usage_key_created ON usage (key_id, created_at)",
            AppendOnly("usage", "usage", "the usage ledger is append-only"),
            # Prices per million tokens in micro-USD; every change is a new row (the newest rules).
            """
            CREATE TABLE prices (
                id INTEGER PRIMARY KEY,
                model TEXT NOT NULL,
                input_musd INTEGER NOT NULL CHECK (input_musd >= 0),
                output_musd INTEGER NOT NULL CHECK (output_musd >= 0),
                created_at TEXT NOT NULL
            )
            """,
            "CREATE INDEX prices_model ON prices (model, id)",
            """
            CREATE TABLE audit_log (
                id INTEGER PRIMARY KEY,
                at TEXT NOT NULL,
                actor TEXT NOT NULL,
                action TEXT NOT NULL,
                target TEXT NULL,
                details TEXT NULL
            )
            """,
            AppendOnly("audit_log", "audit", "the audit log is append-only"),
            # Moderation: rule sets are versioned; a change writes version N+1 in full (its
            # rules, possibly none), so a verdict can name the exact rules it was made under.
            """
            CREATE TABLE moderation_rulesets (
                version INTEGER PRIMARY KEY,
                actor TEXT NOT NULL,
                created_at TEXT NOT NULL
            )
            """,
            """
            CREATE TABLE moderation_rules (
                id INTEGER PRIMARY KEY,
                version INTEGER NOT NULL REFERENCES moderation_rulesets (version),
                category TEXT NOT NULL,
                kind TEXT NOT NULL CHECK (kind IN ('word', 'regex')),
                pattern TEXT NOT NULL,
                created_at TEXT NOT NULL
            )
            """,
            "CREATE INDEX moderation_rules_version ON moderation_rules (version)",
            """
            CREATE TABLE moderation_policies (
                scope TEXT PRIMARY KEY,
                input TEXT NOT NULL CHECK (input IN ('off', 'flag', 'block')),
                output TEXT NOT NULL CHECK (output IN ('off', 'flag', 'block')),
                updated_at TEXT NOT NULL
            )
            """,
        ),
    ),
    Migration(
        4,
        "create eval_results",
        (
            # One row per `lmforge eval` run: what was evaluated (the spec as resolved, and the
            # weights it found), on which file, the metrics and the contamination check (JSON).
            """
            CREATE TABLE eval_results (
                id INTEGER PRIMARY KEY,
                model TEXT NOT NULL,
                model_name TEXT NOT NULL,
                model_path TEXT NOT NULL,
                weights_sha256 TEXT NULL,
                task TEXT NOT NULL,
                data_path TEXT NOT NULL,
                data_sha256 TEXT NOT NULL,
                examples INTEGER NOT NULL CHECK (examples >= 0),
                metrics TEXT NOT NULL,
                contamination_rate REAL NULL,
                contamination TEXT NULL,
                seconds REAL NOT NULL,
                created_at TEXT NOT NULL
            )
            """,
            "CREATE INDEX eval_results_model_name ON eval_results (model_name, id)",
            "CREATE INDEX eval_results_model_path ON eval_results (model_path, id)",
        ),
    ),
    Migration(
        5,
        "create aliases and alias_events",
        (
            """
            CREATE TABLE aliases (
                name TEXT PRIMARY KEY,
                model TEXT NOT NULL,
                version INTEGER NOT NULL CHECK (version >= 1),
                updated_at TEXT NOT NULL
            )
            """,
            """
            CREATE TABLE alias_events (
                id INTEGER PRIMARY KEY,
                alias TEXT NOT NULL,
                action TEXT NOT NULL CHECK (action IN ('promote', 'rollback')),
                from_model TEXT NULL,
                from_version INTEGER NULL,
                to_model TEXT NOT NULL,
                to_version INTEGER NOT NULL,
                undone INTEGER NOT NULL DEFAULT 0 CHECK (undone IN (0, 1)),
                checks TEXT NULL,
                actor TEXT NOT NULL,
                created_at TEXT NOT NULL
            )
            """,
            "CREATE INDEX alias_events_alias ON alias_events (alias, id)",
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
    if engine.dialect.name != POSTGRESQL:  # SQLite: the claim in each transaction is enough
        return _migrate(engine, migrations)
    key = {"key": advisory_key("migrations")}
    with engine.connect() as lock:  # held until migrations end (a session lock)
        lock.execute(text("SELECT pg_advisory_lock(:key)"), key)
        lock.commit()
        try:
            return _migrate(engine, migrations)
        finally:
            lock.execute(text("SELECT pg_advisory_unlock(:key)"), key)
            lock.commit()


def _migrate(engine: Engine, migrations: Sequence[Migration]) -> list[int]:
    dialect = engine.dialect.name
    with engine.begin() as conn:
        conn.exec_driver_sql(ddl(_CREATE_SCHEMA_MIGRATIONS, dialect)[0])
        if dialect == POSTGRESQL:
            conn.exec_driver_sql(POSTGRESQL_PRELUDE)
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
            for step in migration.statements:
                for statement in ddl(step, dialect):
                    conn.exec_driver_sql(statement)
        log.info("registry: applied migration %d (%s)", migration.number, migration.name)
        applied.append(migration.number)
    return applied
