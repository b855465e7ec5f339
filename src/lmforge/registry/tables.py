"""The registry's schema as SQLAlchemy Core `Table` objects, for `repo` to query.

This file mirrors what `migrations` creates; it never creates anything itself (the migrations
are the history, this is the present). `tests/registry` checks the two agree. Every `*_at`
column holds an ISO-8601 UTC timestamp written by `utc_now()`.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    REAL,
    BigInteger,
    Column,
    Double,
    ForeignKey,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
)

# The migrations' INTEGER and REAL are 64-bit in SQLite; on PostgreSQL the same columns are
# BIGINT and DOUBLE PRECISION (see `dialects.ddl`), and bound values are cast to these.
INT64 = BigInteger().with_variant(Integer(), "sqlite")
FLOAT64: Double[float] = Double().with_variant(REAL(), "sqlite")

metadata = MetaData()

schema_migrations = Table(
    "schema_migrations",
    metadata,
    Column("number", INT64, primary_key=True, autoincrement=False),
    Column("name", Text, nullable=False),
    Column("applied_at", Text, nullable=False),
)

models = Table(
    "models",
    metadata,
    Column("id", INT64, primary_key=True),
    Column("name", Text, nullable=False),
    Column("version", INT64, nullable=False),
    Column("path", Text, nullable=False),
    Column("sha256", Text, nullable=False),
    Column("parent", Text, nullable=True),  # free text: "smollm2-135m-instruct" or "name@3"
    Column("arch", Text, nullable=True),
    Column("n_params", INT64, nullable=True),
    Column("source", Text, nullable=True),  # where it was imported from
    Column("created_at", Text, nullable=False),
    UniqueConstraint("name", "version"),
)

datasets = Table(
    "datasets",
    metadata,
    Column("id", INT64, primary_key=True),
    Column("name", Text, nullable=False),
    Column("path", Text, nullable=False),
    Column("content_key", Text, nullable=False),  # sha256 of inputs + options: same key = same data
    Column("manifest_sha256", Text, nullable=False),
    Column("tokenizer", Text, nullable=False),  # "bpe", "char", "byte" or where it came from
    Column("vocab_size", INT64, nullable=False),
    Column("documents", INT64, nullable=False),  # kept, all splits
    Column("tokens", INT64, nullable=False),  # all splits
    Column("created_at", Text, nullable=False),
    Column("updated_at", Text, nullable=False),  # a re-prepare with --overwrite moves this
    UniqueConstraint("name"),
)

# -- migration 3: keys, limits, the usage ledger, prices, audit log, moderation -----------------
# Money is integers: prices in micro-USD per million tokens, costs and budgets in nano-USD.

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", INT64, primary_key=True),
    Column("name", Text, nullable=False),
    Column("prefix", Text, nullable=False),  # the key's first characters, to show and look up
    Column("key_hash", Text, nullable=False),  # sha256 of the whole key, lowercase hex
    Column("models", Text, nullable=True),  # JSON list of model names; NULL: every model
    Column("rpm", INT64, nullable=True),  # requests per minute; NULL: no limit
    Column("tpm", INT64, nullable=True),  # tokens per minute
    Column("budget_nusd", INT64, nullable=True),
    Column("budget_period", Text, nullable=False),  # "month" | "total"
    Column("expires_at", Text, nullable=True),
    Column("admin", INT64, nullable=False),
    Column("created_at", Text, nullable=False),
    Column("updated_at", Text, nullable=False),
    Column("revoked_at", Text, nullable=True),
    Column("req_window", FLOAT64, nullable=False),  # unix time the requests window started
    Column("req_used", INT64, nullable=False),
    Column("tok_window", FLOAT64, nullable=False),
    Column("tok_used", INT64, nullable=False),  # reserved at admission, settled after
    Column("spend_period", Text, nullable=False),  # "2026-11" or "total"
    Column("spent_nusd", INT64, nullable=False),  # settled spend in spend_period
    Column("reserved_nusd", INT64, nullable=False),  # held by requests in flight
    UniqueConstraint("name"),
    UniqueConstraint("key_hash"),
)

reservations = Table(
    "reservations",
    metadata,
    Column("request_id", Text, primary_key=True),
    Column("key_id", INT64, ForeignKey("api_keys.id"), nullable=False),
    Column("tokens", INT64, nullable=False),
    Column("cost_nusd", INT64, nullable=False),
    Column("tok_window", FLOAT64, nullable=False),  # the tokens window the tokens were taken from
    Column("expires", FLOAT64, nullable=False),  # unix time after which a sweep releases it
)

usage = Table(
    "usage",
    metadata,
    Column("id", INT64, primary_key=True),
    Column("request_id", Text, nullable=False),
    Column("key_id", INT64, ForeignKey("api_keys.id"), nullable=True),
    Column("endpoint", Text, nullable=False),
    Column("model", Text, nullable=True),
    Column("model_version", Text, nullable=True),  # "name@3", or "name@sha256:<12 hex>"
    Column("prompt_tokens", INT64, nullable=False),
    Column("completion_tokens", INT64, nullable=False),
    Column("ttft_ms", FLOAT64, nullable=True),
    Column("latency_ms", FLOAT64, nullable=False),
    Column("status", Text, nullable=False),
    Column("http_status", INT64, nullable=False),
    Column("cost_nusd", INT64, nullable=False),
    Column("price_input", INT64, nullable=True),  # micro-USD per million tokens, as billed
    Column("price_output", INT64, nullable=True),
    Column("created_at", Text, nullable=False),
    UniqueConstraint("request_id"),
)

prices = Table(
    "prices",
    metadata,
    Column("id", INT64, primary_key=True),
    Column("model", Text, nullable=False),
    Column("input_musd", INT64, nullable=False),
    Column("output_musd", INT64, nullable=False),
    Column("created_at", Text, nullable=False),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", INT64, primary_key=True),
    Column("at", Text, nullable=False),
    Column("actor", Text, nullable=False),  # "cli:<user>" or "key:<name>"
    Column("action", Text, nullable=False),  # "key.create", "price.set", …
    Column("target", Text, nullable=True),
    Column("details", Text, nullable=True),  # JSON
)

moderation_rulesets = Table(
    "moderation_rulesets",
    metadata,
    Column("version", INT64, primary_key=True, autoincrement=False),
    Column("actor", Text, nullable=False),
    Column("created_at", Text, nullable=False),
)

moderation_rules = Table(
    "moderation_rules",
    metadata,
    Column("id", INT64, primary_key=True),
    Column("version", INT64, ForeignKey("moderation_rulesets.version"), nullable=False),
    Column("category", Text, nullable=False),
    Column("kind", Text, nullable=False),  # "word" | "regex"
    Column("pattern", Text, nullable=False),
    Column("created_at", Text, nullable=False),
)

moderation_policies = Table(
    "moderation_policies",
    metadata,
    Column("scope", Text, primary_key=True),  # "default", "key:<name>" or "model:<name>"
    Column("input", Text, nullable=False),  # "off" | "flag" | "block"
    Column("output", Text, nullable=False),
    Column("updated_at", Text, nullable=False),
)

# -- migration 4: evaluation results --------------------------------------------------------------

eval_results = Table(
    "eval_results",
    metadata,
    Column("id", INT64, primary_key=True),
    Column("model", Text, nullable=False),  # the spec as resolved: "sst2@2", a path, a built-in
    Column("model_name", Text, nullable=False),
    Column("model_path", Text, nullable=False),
    Column("weights_sha256", Text, nullable=True),  # NULL: not known (e.g. no lmforge.json)
    Column("task", Text, nullable=False),  # "perplexity" | "classify" | "qa" | "bleu"
    Column("data_path", Text, nullable=False),
    Column("data_sha256", Text, nullable=False),
    Column("examples", INT64, nullable=False),
    Column("metrics", Text, nullable=False),  # JSON object
    Column("contamination_rate", FLOAT64, nullable=True),  # flagged examples / examples
    Column("contamination", Text, nullable=True),  # JSON object; NULL: not checked
    Column("seconds", FLOAT64, nullable=False),
    Column("created_at", Text, nullable=False),
)


def utc_now() -> str:
    """Now as stored in `*_at` columns, e.g. `2025-01-31T12:00:00.123456Z`."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- migration 5: aliases (eval-gated promotion) ------------------------------------------------

aliases = Table(
    "aliases",
    metadata,
    Column("name", Text, primary_key=True),
    Column("model", Text, nullable=False),  # a registry model name
    Column("version", INT64, nullable=False),
    Column("updated_at", Text, nullable=False),
)

alias_events = Table(
    "alias_events",
    metadata,
    Column("id", INT64, primary_key=True),
    Column("alias", Text, nullable=False),
    Column("action", Text, nullable=False),  # "promote" | "rollback"
    Column("from_model", Text, nullable=True),  # None: the alias's first promotion
    Column("from_version", INT64, nullable=True),
    Column("to_model", Text, nullable=False),
    Column("to_version", INT64, nullable=False),
    Column("undone", INT64, nullable=False, default=0),  # a promotion a rollback took back
    Column("checks", Text, nullable=True),  # JSON: the eval requirements and what they found
    Column("actor", Text, nullable=False),
    Column("created_at", Text, nullable=False),
)
