"""Admin actions on keys and prices, each with its audit entry in the same transaction.

The CLI (`lmforge keys …`, `lmforge models price`) and the server's admin routes both call these,
so a key created either way is the same row and the same audit entry. Inputs arrive as users
type them (dollars as text, dates as `2026-12-31`) and are checked here; `key_view` is the one
JSON shape of a key (never the key itself, only its prefix).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine

from lmforge.errors import LmforgeError
from lmforge.ops.pricing import MICRO, NANO, format_price, format_usd, parse_usd
from lmforge.registry import keys as key_sql
from lmforge.registry.audit import record_audit
from lmforge.registry.keys import KeyRecord, budget_period_of, mask
from lmforge.registry.ledger import PriceRecord, set_price
from lmforge.registry.repo import validate_name
from lmforge.registry.tables import utc_now

UNSET: Any = object()


def parse_expiry(text: str) -> str:
    """`2026-12-31` or an ISO-8601 time → the stored form (UTC); must lie in the future."""
    raw = text.strip()
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise LmforgeError(f"expires: {text!r} is not a date like 2026-12-31") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    stored = moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if stored <= utc_now():
        raise LmforgeError(f"expires: {text!r} is in the past")
    return stored


def parse_models(models: str | list[str] | None) -> list[str] | None:
    """ "a,b" or ["a", "b"] → ["a", "b"], each a valid model name; None or "" → every model."""
    if models is None:
        return None
    items = models.split(",") if isinstance(models, str) else list(models)
    names = [m.strip() for m in items if m.strip()]
    if not names:
        return None
    for name in names:
        validate_name(name)
    return names


def _budget(budget: str | float | None) -> int | None:
    return None if budget is None else parse_usd(budget, what="budget", scale=NANO)


def _limit(name: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise LmforgeError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def create_key(
    engine: Engine,
    *,
    actor: str,
    name: str,
    models: str | list[str] | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    budget: str | float | None = None,
    budget_period: str = "total",
    expires: str | None = None,
    admin: bool = False,
) -> tuple[KeyRecord, str]:
    """Create key NAME; return its record and the key (shown once, never stored)."""
    fields: dict[str, Any] = {
        "models": parse_models(models),
        "rpm": _limit("rpm", rpm),
        "tpm": _limit("tpm", tpm),
        "budget_nusd": _budget(budget),
        "budget_period": budget_period,
        "expires_at": None if expires is None else parse_expiry(expires),
        "admin": admin,
    }
    with engine.begin() as conn:
        record, key = key_sql.create_key(conn, name=name, **fields)
        record_audit(conn, actor=actor, action="key.create", target=name, details=_audit(fields))
    return record, key


def update_key(
    engine: Engine,
    *,
    actor: str,
    name: str,
    models: Any = UNSET,
    rpm: Any = UNSET,
    tpm: Any = UNSET,
    budget: Any = UNSET,
    budget_period: Any = UNSET,
    expires: Any = UNSET,
    admin: Any = UNSET,
) -> KeyRecord:
    """Change key NAME's settings; arguments left UNSET stay, None removes a limit."""
    changes: dict[str, Any] = {}
    if models is not UNSET:
        changes["models"] = parse_models(models)
    for field, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not UNSET:
            changes[field] = _limit(field, value)
    if budget is not UNSET:
        changes["budget_nusd"] = _budget(budget)
    if budget_period is not UNSET:
        changes["budget_period"] = budget_period
    if expires is not UNSET:
        changes["expires_at"] = None if expires is None else parse_expiry(expires)
    if admin is not UNSET:
        changes["admin"] = bool(admin)
    if not changes:
        raise LmforgeError("nothing to update: give at least one setting to change")
    with engine.begin() as conn:
        record = key_sql.update_key(conn, name=name, **changes)
        record_audit(conn, actor=actor, action="key.update", target=name, details=_audit(changes))
    return record


def revoke_key(engine: Engine, *, actor: str, name: str) -> KeyRecord:
    with engine.begin() as conn:
        record = key_sql.revoke_key(conn, name=name)
        record_audit(conn, actor=actor, action="key.revoke", target=name)
    return record


def price_model(engine: Engine, *, actor: str, model: str, input: str, output: str) -> PriceRecord:
    """Set MODEL's price in dollars per million input / output tokens (up to 6 decimals)."""
    input_musd = parse_usd(input, what="input price", scale=MICRO)
    output_musd = parse_usd(output, what="output price", scale=MICRO)
    with engine.begin() as conn:
        record = set_price(conn, model=model, input_musd=input_musd, output_musd=output_musd)
        details = {"input": format_price(input_musd), "output": format_price(output_musd)}
        record_audit(conn, actor=actor, action="price.set", target=model, details=details)
    return record


def _audit(fields: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in fields.items() if k != "budget_nusd"}
    if "budget_nusd" in fields:
        nusd = fields["budget_nusd"]
        out["budget"] = None if nusd is None else format_usd(nusd)
    return out


@dataclass(frozen=True)
class KeyState:
    """What `keys show` and the admin API report about a key right now."""

    record: KeyRecord
    now: float

    def view(self) -> dict[str, Any]:
        r = self.record
        period = budget_period_of(r.budget_period, self.now)
        spent = r.spent_in(period)
        in_window = self.now < r.req_window + key_sql.WINDOW_S
        tok_window = self.now < r.tok_window + key_sql.WINDOW_S
        status = "revoked" if r.revoked_at else "expired" if r.expired() else "active"
        return {
            "name": r.name,
            "key": mask(r.prefix),
            "status": status,
            "admin": r.admin,
            "models": None if r.models is None else list(r.models),
            "rpm": r.rpm,
            "tpm": r.tpm,
            "budget": None if r.budget_nusd is None else format_usd(r.budget_nusd),
            "budget_period": r.budget_period,
            "spent": format_usd(spent),
            "spend_period": period,
            "reserved": format_usd(r.reserved_nusd),
            "requests_this_minute": r.req_used if in_window else 0,
            "tokens_this_minute": r.tok_used if tok_window else 0,
            "expires_at": r.expires_at,
            "created_at": r.created_at,
            "revoked_at": r.revoked_at,
        }


def key_view(record: KeyRecord) -> dict[str, Any]:
    return KeyState(record, datetime.now(UTC).timestamp()).view()
