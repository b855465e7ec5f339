"""Admin routes (admin keys only, see `create_app`): keys, prices, usage, audit log.

The same operations as `lmforge keys`, `lmforge models price` and `lmforge usage`, through
`ops.accounts` so that both write the same rows and audit entries; the actor recorded is
`key:<admin key name>`. A created key is in the response once and never again.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from lmforge.ops import accounts
from lmforge.ops.pricing import format_price, format_usd
from lmforge.registry.audit import list_audit
from lmforge.registry.keys import KeyRecord, get_key, list_keys
from lmforge.registry.ledger import list_prices, usage_totals
from lmforge.serve.auth import Key
from lmforge.serve.errors import OpenAIError
from lmforge.serve.state import ServerState, State

router = APIRouter(prefix="/v1/admin")

Usd = str | float | int


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class KeyCreate(_Strict):
    name: str = Field(max_length=64)
    models: list[str] | None = Field(default=None, max_length=256)
    rpm: int | None = Field(default=None, ge=0)
    tpm: int | None = Field(default=None, ge=0)
    budget: Usd | None = None
    budget_period: Literal["month", "total"] = "total"
    expires: str | None = Field(default=None, max_length=64)
    admin: bool = False


class KeyUpdate(_Strict):
    models: list[str] | None = Field(default=None, max_length=256)
    rpm: int | None = Field(default=None, ge=0)
    tpm: int | None = Field(default=None, ge=0)
    budget: Usd | None = None
    budget_period: Literal["month", "total"] | None = None
    expires: str | None = Field(default=None, max_length=64)
    admin: bool | None = None


class PriceSet(_Strict):
    input: Usd
    output: Usd


def _actor(key: KeyRecord | None) -> str:
    return "server:no-auth" if key is None else f"key:{key.name}"


def _known(state: ServerState, name: str) -> None:
    with state.registry.connect() as conn:
        if get_key(conn, name=name) is None:
            raise OpenAIError(404, f"no key named {name!r}", param="name", code="key_not_found")


@router.get("/keys")
def keys_list(state: State) -> Any:
    with state.registry.connect() as conn:
        records = list_keys(conn)
    return {"object": "list", "data": [accounts.key_view(r) for r in records]}


@router.post("/keys", status_code=201)
def keys_create(body: KeyCreate, state: State, caller_key: Key) -> Any:
    record, key = accounts.create_key(
        state.registry,
        actor=_actor(caller_key),
        name=body.name,
        models=body.models,
        rpm=body.rpm,
        tpm=body.tpm,
        budget=None if body.budget is None else str(body.budget),
        budget_period=body.budget_period,
        expires=body.expires,
        admin=body.admin,
    )
    return JSONResponse({**accounts.key_view(record), "key": key}, status_code=201)


@router.get("/keys/{name}")
def keys_show(name: str, state: State) -> Any:
    with state.registry.connect() as conn:
        record = get_key(conn, name=name)
    if record is None:
        raise OpenAIError(404, f"no key named {name!r}", param="name", code="key_not_found")
    return accounts.key_view(record)


@router.patch("/keys/{name}")
def keys_update(name: str, body: KeyUpdate, state: State, key: Key) -> Any:
    _known(state, name)
    changes: dict[str, Any] = {}
    for field in body.model_fields_set:
        value = getattr(body, field)
        if field == "budget" and value is not None:
            value = str(value)
        if field == "budget_period" and value is None:
            continue
        changes[field] = value
    record = accounts.update_key(state.registry, actor=_actor(key), name=name, **changes)
    return accounts.key_view(record)


@router.delete("/keys/{name}")
def keys_revoke(name: str, state: State, key: Key) -> Any:
    _known(state, name)
    record = accounts.revoke_key(state.registry, actor=_actor(key), name=name)
    return accounts.key_view(record)


@router.get("/prices")
def prices_list(state: State) -> Any:
    with state.registry.connect() as conn:
        records = list_prices(conn)
    return {
        "object": "list",
        "data": [_price(p.model, p.input_musd, p.output_musd) for p in records],
    }


@router.put("/prices/{model}")
def prices_set(model: str, body: PriceSet, state: State, key: Key) -> Any:
    record = accounts.price_model(
        state.registry,
        actor=_actor(key),
        model=model,
        input=str(body.input),
        output=str(body.output),
    )
    return _price(record.model, record.input_musd, record.output_musd)


def _price(model: str, input_musd: int, output_musd: int) -> dict[str, Any]:
    return {
        "model": model,
        "input_per_million": format_price(input_musd),
        "output_per_million": format_price(output_musd),
    }


@router.get("/usage")
def usage(
    state: State,
    key: str | None = None,
    model: str | None = None,
    since: str | None = None,
    until: str | None = None,
    group_by: Literal["key", "model", "day"] | None = None,
) -> Any:
    with state.registry.connect() as conn:
        groups = usage_totals(
            conn, group_by=group_by, key=key, model=model, since=since, until=until
        )
    return {
        "object": "list",
        "data": [
            {
                "group": g.group,
                "requests": g.requests,
                "ok": g.ok,
                "prompt_tokens": g.prompt_tokens,
                "completion_tokens": g.completion_tokens,
                "cost_nanousd": g.cost_nusd,
                "cost": format_usd(g.cost_nusd),
            }
            for g in groups
        ],
    }


@router.get("/audit")
def audit(
    state: State, action: str | None = None, target: str | None = None, limit: int = 100
) -> Any:
    if not 1 <= limit <= 10_000:
        raise OpenAIError(400, "limit must be between 1 and 10000", param="limit")
    with state.registry.connect() as conn:
        entries = list_audit(conn, action=action, target=target, limit=limit)
    return {
        "object": "list",
        "data": [
            {
                "at": e.at,
                "actor": e.actor,
                "action": e.action,
                "target": e.target,
                "details": e.details,
            }
            for e in entries
        ],
    }
