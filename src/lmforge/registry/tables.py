"""The registry's schema as SQLAlchemy Core `Table` objects, for `repo` to query.

This file mirrors what `migrations` creates; it never creates anything itself (the migrations
are the history, this is the present). `tests/registry` checks the two agree. Every `*_at`
column holds an ISO-8601 UTC timestamp written by `utc_now()`.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Column, Integer, MetaData, Table, Text, UniqueConstraint

metadata = MetaData()

schema_migrations = Table(
    "schema_migrations",
    metadata,
    Column("number", Integer, primary_key=True, autoincrement=False),
    Column("name", Text, nullable=False),
    Column("applied_at", Text, nullable=False),
)

models = Table(
    "models",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("path", Text, nullable=False),
    Column("sha256", Text, nullable=False),
    Column("parent", Text, nullable=True),  # free text: "smollm2-135m-instruct" or "name@3"
    Column("arch", Text, nullable=True),
    Column("n_params", Integer, nullable=True),
    Column("source", Text, nullable=True),  # where it was imported from
    Column("created_at", Text, nullable=False),
    UniqueConstraint("name", "version"),
)

datasets = Table(
    "datasets",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", Text, nullable=False),
    Column("path", Text, nullable=False),
    Column("content_key", Text, nullable=False),  # sha256 of inputs + options: same key = same data
    Column("manifest_sha256", Text, nullable=False),
    Column("tokenizer", Text, nullable=False),  # "bpe", "char", "byte" or where it came from
    Column("vocab_size", Integer, nullable=False),
    Column("documents", Integer, nullable=False),  # kept, all splits
    Column("tokens", Integer, nullable=False),  # all splits
    Column("created_at", Text, nullable=False),
    Column("updated_at", Text, nullable=False),  # a re-prepare with --overwrite moves this
    UniqueConstraint("name"),
)


def utc_now() -> str:
    """Now as stored in `*_at` columns, e.g. `2025-01-31T12:00:00.123456Z`."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
