"""The usage ledger and model prices: SQL only (pricing arithmetic is `ops.pricing`'s).

`usage` is append-only (triggers refuse UPDATE and DELETE) and idempotent on `request_id`:
`record_usage` inserts a request's row once and says whether it did, so a settlement retried
after a crash or run twice by mistake bills once. Prices are history: `set_price` adds a row, the
newest row of a model is in force, and each usage row copies the prices it was billed at.

Money is integers: prices in micro-USD per million tokens, costs in nano-USD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    and_,
    case,
    cast,
    func,
    insert,
    literal,
    select,
)

from lmforge.errors import LmforgeError
from lmforge.registry import dialects
from lmforge.registry.repo import validate_name
from lmforge.registry.tables import api_keys, prices, usage, utc_now

GroupBy = Literal["key", "model", "day"]


@dataclass(frozen=True)
class UsageRecord:
    """One request in the ledger."""

    id: int
    request_id: str
    key_id: int | None
    endpoint: str  # "/v1/chat/completions", …
    model: str | None  # the served name
    model_version: str | None  # "name@3", or "name@sha256:<12 hex>" outside the registry
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    latency_ms: float
    status: str  # "ok", "cancelled", "error", "rate_limited", "quota_exceeded", "blocked"
    http_status: int
    cost_nusd: int
    price_input: int | None  # micro-USD per million tokens, as billed
    price_output: int | None
    created_at: str
    key_name: str | None = None


def record_usage(
    conn: Connection,
    *,
    request_id: str,
    key_id: int | None,
    endpoint: str,
    model: str | None,
    model_version: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    ttft_ms: float | None,
    latency_ms: float,
    status: str,
    http_status: int,
    cost_nusd: int,
    price_input: int | None,
    price_output: int | None,
) -> bool:
    """Append REQUEST_ID's row; False (and nothing written) if the ledger already has it."""
    statement = (
        dialects.insert(conn, usage)
        .values(
            request_id=request_id,
            key_id=key_id,
            endpoint=endpoint,
            model=model,
            model_version=model_version,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            ttft_ms=ttft_ms,
            latency_ms=latency_ms,
            status=status,
            http_status=http_status,
            cost_nusd=cost_nusd,
            price_input=price_input,
            price_output=price_output,
            created_at=utc_now(),
        )
        .on_conflict_do_nothing(index_elements=[usage.c.request_id])
        .returning(usage.c.id)  # rowcount is not reliable here on PostgreSQL: a row or none
    )
    return conn.execute(statement).first() is not None


def _usage_query() -> Any:
    return select(usage, api_keys.c.name.label("key_name")).outerjoin(
        api_keys, usage.c.key_id == api_keys.c.id
    )


def get_usage(conn: Connection, *, request_id: str) -> UsageRecord | None:
    """REQUEST_ID's row, or None."""
    row = conn.execute(_usage_query().where(usage.c.request_id == request_id)).one_or_none()
    return None if row is None else UsageRecord(**row._mapping)


def _filters(
    key: str | None, model: str | None, since: str | None, until: str | None
) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if key is not None:
        where.append(api_keys.c.name == key)
    if model is not None:
        where.append(usage.c.model == model)
    if since is not None:
        where.append(usage.c.created_at >= since)
    if until is not None:
        where.append(usage.c.created_at < until)
    return where


def list_usage(
    conn: Connection,
    *,
    key: str | None = None,
    model: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: int | None = None,
) -> list[UsageRecord]:
    """Ledger rows, oldest first, for key name KEY / model MODEL in [SINCE, UNTIL) (ISO UTC)."""
    query = _usage_query().where(and_(True, *_filters(key, model, since, until)))
    query = query.order_by(usage.c.id)
    if limit is not None:
        query = query.limit(limit)
    return [UsageRecord(**row._mapping) for row in conn.execute(query)]


@dataclass(frozen=True)
class UsageGroup:
    """Totals over the ledger rows of one group (a key, a model, a UTC day, or all)."""

    group: str
    requests: int
    ok: int  # requests that ran to the end
    prompt_tokens: int
    completion_tokens: int
    cost_nusd: int


def usage_totals(
    conn: Connection,
    *,
    group_by: GroupBy | None = None,
    key: str | None = None,
    model: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> list[UsageGroup]:
    """Totals per GROUP_BY (or one group "all"), sorted by group, over the filtered ledger."""
    group: Any
    if group_by == "key":
        group = func.coalesce(api_keys.c.name, "(no key)")
    elif group_by == "model":
        group = func.coalesce(usage.c.model, "(no model)")
    elif group_by == "day":
        group = func.substr(usage.c.created_at, 1, 10)
    elif group_by is None:
        group = literal("all")
    else:
        raise LmforgeError(f"group by must be key, model or day, got {group_by!r}")
    query = (
        select(
            group.label("group"),
            func.count().label("requests"),
            _total(case((usage.c.status == "ok", 1), else_=0)).label("ok"),
            _total(usage.c.prompt_tokens).label("prompt_tokens"),
            _total(usage.c.completion_tokens).label("completion_tokens"),
            _total(usage.c.cost_nusd).label("cost_nusd"),
        )
        .select_from(usage.outerjoin(api_keys, usage.c.key_id == api_keys.c.id))
        .where(and_(True, *_filters(key, model, since, until)))
    )
    if group_by is not None:  # PostgreSQL refuses a constant in GROUP BY
        query = query.group_by(group).order_by(group)
    rows = [UsageGroup(**row._mapping) for row in conn.execute(query)]
    return [r for r in rows if r.requests]


# -- prices ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PriceRecord:
    """A model's price per million tokens, in micro-USD, in force since CREATED_AT."""

    model: str
    input_musd: int
    output_musd: int
    created_at: str


def set_price(conn: Connection, *, model: str, input_musd: int, output_musd: int) -> PriceRecord:
    """Make MODEL's price INPUT_MUSD / OUTPUT_MUSD per million tokens from now on."""
    validate_name(model)
    if input_musd < 0 or output_musd < 0:
        raise LmforgeError("prices must be >= 0")
    statement = (
        insert(prices)
        .values(model=model, input_musd=input_musd, output_musd=output_musd, created_at=utc_now())
        .returning(prices.c.model, prices.c.input_musd, prices.c.output_musd, prices.c.created_at)
    )
    return PriceRecord(**conn.execute(statement).one()._mapping)


def get_price(conn: Connection, *, model: str) -> PriceRecord | None:
    """MODEL's price in force, or None when it has none (it is then free)."""
    query = (
        select(prices.c.model, prices.c.input_musd, prices.c.output_musd, prices.c.created_at)
        .where(prices.c.model == model)
        .order_by(prices.c.id.desc())
        .limit(1)
    )
    row = conn.execute(query).one_or_none()
    return None if row is None else PriceRecord(**row._mapping)


def list_prices(conn: Connection) -> list[PriceRecord]:
    """The price in force of every priced model, sorted by model."""
    newest = select(func.max(prices.c.id)).group_by(prices.c.model).scalar_subquery()
    query = (
        select(prices.c.model, prices.c.input_musd, prices.c.output_musd, prices.c.created_at)
        .where(prices.c.id.in_(newest))
        .order_by(prices.c.model)
    )
    return [PriceRecord(**row._mapping) for row in conn.execute(query)]


@dataclass(frozen=True)
class InvoiceLine:
    """Ledger totals of one key on one model at one price."""

    key: str
    model: str
    price_input: int | None  # micro-USD per million tokens
    price_output: int | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_nusd: int


def invoice_lines(
    conn: Connection, *, since: str, until: str, key: str | None = None
) -> list[InvoiceLine]:
    """Totals per key, model and price over [SINCE, UNTIL), sorted; rows of no key excluded."""
    key_name = api_keys.c.name
    model = func.coalesce(usage.c.model, "(no model)")
    query = (
        select(
            key_name.label("key"),
            model.label("model"),
            usage.c.price_input,
            usage.c.price_output,
            func.count().label("requests"),
            _total(usage.c.prompt_tokens).label("prompt_tokens"),
            _total(usage.c.completion_tokens).label("completion_tokens"),
            _total(usage.c.cost_nusd).label("cost_nusd"),
        )
        .select_from(usage.join(api_keys, usage.c.key_id == api_keys.c.id))
        .where(and_(True, *_filters(key, None, since, until)))
        .group_by(key_name, model, usage.c.price_input, usage.c.price_output)
        .order_by(key_name, model, usage.c.price_input, usage.c.price_output)
    )
    return [InvoiceLine(**row._mapping) for row in conn.execute(query)]


def ledger_total(
    conn: Connection,
    *,
    since: str | None = None,
    until: str | None = None,
    key: str | None = None,
    keyed: bool = False,
) -> int:
    """The sum of cost_nusd over the filtered ledger (with KEYED, only rows of some key)."""
    joined = (
        usage.join(api_keys, usage.c.key_id == api_keys.c.id)
        if keyed
        else usage.outerjoin(api_keys, usage.c.key_id == api_keys.c.id)
    )
    query = (
        select(_total(usage.c.cost_nusd))
        .select_from(joined)
        .where(and_(True, *_filters(key, None, since, until)))
    )
    return int(conn.execute(query).scalar_one())


def _total(column: Any) -> Any:
    """SUM(COLUMN) as a 64-bit integer, 0 over no rows (PostgreSQL's SUM of BIGINT is NUMERIC)."""
    return cast(func.coalesce(func.sum(column), 0), BigInteger)
