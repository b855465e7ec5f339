"""API keys and their limits: SQL only.

A key is `lmf-` + 43 random URL-safe characters, shown once at creation. The registry keeps its
sha256 and its first 12 characters (the prefix, to look it up and to show); `find_key` fetches
the rows with the presented key's prefix and compares hashes with `hmac.compare_digest`.

Limits are enforced by the database, not by process memory, so they hold across uvicorn workers
and across server processes that share the registry:

- `admit` is ONE conditional UPDATE: it moves the key's one-minute request and token windows,
  counts the request, takes the token reservation (prompt + max_tokens) and the cost
  reservation, but only if the request count, the token count and the budget (spent in the
  period + reserved + this reservation) all stay within the key's limits. Zero rows updated
  means refused; the reservation is recorded in `reservations` in the same transaction.
- `settle` (in the transaction that appends the request's ledger row) gives the reservation
  back: the unused tokens return to the window they were taken from, the reserved cost leaves
  `reserved_nusd` and the actual cost joins `spent_nusd`.
- `release_expired` frees reservations of requests that never settled (a killed server).

Windows start at a key's first request after the previous window ended (not on the clock's
minute), so "rpm = 10" means at most 10 requests in any window the key opens.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, insert, select, text, update

from lmforge.errors import LmforgeError
from lmforge.registry import dialects
from lmforge.registry.repo import NAME_PATTERN
from lmforge.registry.tables import api_keys, reservations, utc_now

KEY_PREFIX = "lmf-"
PREFIX_LEN = 12  # "lmf-" + 8 random characters
WINDOW_S = 60.0
_KEY_PATTERN = re.compile(r"lmf-[A-Za-z0-9_-]{43}")


def new_key() -> str:
    """A fresh random key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def mask(prefix: str) -> str:
    """How a key is shown after creation: its prefix and an ellipsis."""
    return f"{prefix}…"


def budget_period_of(period: str, now: float) -> str:
    """The spend period a request at NOW falls in: "2026-11" for monthly budgets, or "total"."""
    if period == "month":
        return datetime.fromtimestamp(now, UTC).strftime("%Y-%m")
    return "total"


@dataclass(frozen=True)
class KeyRecord:
    """One API key (never the key itself) with its limits and current usage."""

    id: int
    name: str
    prefix: str
    models: tuple[str, ...] | None  # None: every model
    rpm: int | None
    tpm: int | None
    budget_nusd: int | None
    budget_period: str  # "month" | "total"
    expires_at: str | None
    admin: bool
    created_at: str
    updated_at: str
    revoked_at: str | None
    spend_period: str
    spent_nusd: int
    reserved_nusd: int
    req_window: float
    req_used: int
    tok_window: float
    tok_used: int

    def expired(self, now: str | None = None) -> bool:
        return self.expires_at is not None and (now or utc_now()) >= self.expires_at

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def spent_in(self, period: str) -> int:
        return self.spent_nusd if self.spend_period == period else 0


def _key(row: Any) -> KeyRecord:
    values = {k: row[k] for k in KeyRecord.__dataclass_fields__}
    values["models"] = None if row["models"] is None else tuple(json.loads(row["models"]))
    values["admin"] = bool(row["admin"])
    return KeyRecord(**values)


def _check_limits(values: dict[str, Any]) -> None:
    for name in ("rpm", "tpm", "budget_nusd"):
        value = values.get(name)
        if value is not None and (isinstance(value, bool) or value < 0):
            label = "budget" if name == "budget_nusd" else name
            raise LmforgeError(f"{label} must be >= 0, got {value}")
    if values.get("budget_period", "total") not in ("month", "total"):
        raise LmforgeError(f"budget period must be month or total, got {values['budget_period']!r}")
    models = values.get("models")
    if models is not None:
        for model in models:
            if not NAME_PATTERN.fullmatch(model):
                raise LmforgeError(f"invalid model name {model!r} in the key's models")


def create_key(
    conn: Connection,
    *,
    name: str,
    models: list[str] | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    budget_nusd: int | None = None,
    budget_period: str = "total",
    expires_at: str | None = None,
    admin: bool = False,
) -> tuple[KeyRecord, str]:
    """Create key NAME; return its record and the key itself (the only time it exists)."""
    if not NAME_PATTERN.fullmatch(name):
        raise LmforgeError(
            f"invalid key name {name!r}: use 1-64 of a-z 0-9 . _ - starting with a-z or 0-9"
        )
    values: dict[str, Any] = {
        "models": models,
        "rpm": rpm,
        "tpm": tpm,
        "budget_nusd": budget_nusd,
        "budget_period": budget_period,
    }
    _check_limits(values)
    key = new_key()
    now = utc_now()
    statement = (
        dialects.insert(conn, api_keys)
        .values(
            name=name,
            prefix=key[:PREFIX_LEN],
            key_hash=hash_key(key),
            models=None if models is None else json.dumps(sorted(set(models))),
            rpm=rpm,
            tpm=tpm,
            budget_nusd=budget_nusd,
            budget_period=budget_period,
            expires_at=expires_at,
            admin=int(admin),
            created_at=now,
            updated_at=now,
            spend_period=budget_period_of(budget_period, datetime.now(UTC).timestamp()),
        )
        .on_conflict_do_nothing()
        .returning(*api_keys.c)
    )
    row = conn.execute(statement).one_or_none()
    if row is None:
        raise LmforgeError(f"a key named {name!r} already exists")
    return _key(row._mapping), key


def find_key(conn: Connection, *, key: str) -> KeyRecord | None:
    """The record of KEY (revoked and expired ones included), or None if it is not a key."""
    digest = hash_key(key)
    if not _KEY_PATTERN.fullmatch(key):
        return None
    found = None
    rows = conn.execute(select(api_keys).where(api_keys.c.prefix == key[:PREFIX_LEN]))
    for row in rows:
        if hmac.compare_digest(row.key_hash, digest):
            found = _key(row._mapping)
    return found


def get_key(conn: Connection, *, name: str) -> KeyRecord | None:
    row = conn.execute(select(api_keys).where(api_keys.c.name == name)).one_or_none()
    return None if row is None else _key(row._mapping)


def get_key_by_id(conn: Connection, *, key_id: int) -> KeyRecord | None:
    row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one_or_none()
    return None if row is None else _key(row._mapping)


def list_keys(conn: Connection, *, include_revoked: bool = True) -> list[KeyRecord]:
    query = select(api_keys).order_by(api_keys.c.name)
    if not include_revoked:
        query = query.where(api_keys.c.revoked_at.is_(None))
    return [_key(row._mapping) for row in conn.execute(query)]


_UPDATABLE = ("models", "rpm", "tpm", "budget_nusd", "budget_period", "expires_at", "admin")


def update_key(conn: Connection, *, name: str, **changes: Any) -> KeyRecord:
    """Change key NAME's limits (any of models, rpm, tpm, budget_nusd, budget_period,
    expires_at, admin; None removes a limit). Revoked keys cannot be changed."""
    unknown = sorted(set(changes) - set(_UPDATABLE))
    if unknown:
        raise LmforgeError(f"cannot update {', '.join(unknown)} of a key")
    _check_limits(changes)
    values = dict(changes)
    if "models" in values and values["models"] is not None:
        values["models"] = json.dumps(sorted(set(values["models"])))
    if "admin" in values:
        values["admin"] = int(bool(values["admin"]))
    statement = (
        update(api_keys)
        .where(api_keys.c.name == name, api_keys.c.revoked_at.is_(None))
        .values(updated_at=utc_now(), **values)
        .returning(*api_keys.c)
    )
    row = conn.execute(statement).one_or_none()
    if row is None:
        raise _missing_or_revoked(conn, name)
    return _key(row._mapping)


def revoke_key(conn: Connection, *, name: str) -> KeyRecord:
    """Revoke key NAME from now on (its usage stays in the ledger)."""
    now = utc_now()
    statement = (
        update(api_keys)
        .where(api_keys.c.name == name, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=now, updated_at=now)
        .returning(*api_keys.c)
    )
    row = conn.execute(statement).one_or_none()
    if row is None:
        raise _missing_or_revoked(conn, name)
    return _key(row._mapping)


def _missing_or_revoked(conn: Connection, name: str) -> LmforgeError:
    if get_key(conn, name=name) is None:
        return LmforgeError(f"no key named {name!r}")
    return LmforgeError(f"key {name!r} is revoked")


# -- admission and settlement ------------------------------------------------------------------

_ADMIT = text(
    """
    UPDATE api_keys SET
        req_window = CASE WHEN :now >= req_window + :window THEN :now ELSE req_window END,
        req_used = CASE WHEN :now >= req_window + :window THEN 0 ELSE req_used END + 1,
        tok_window = CASE WHEN :now >= tok_window + :window THEN :now ELSE tok_window END,
        tok_used = CASE WHEN :now >= tok_window + :window THEN 0 ELSE tok_used END + :tokens,
        spent_nusd = CASE WHEN spend_period = :period THEN spent_nusd ELSE 0 END,
        spend_period = :period,
        reserved_nusd = reserved_nusd + :cost
    WHERE id = :key_id AND revoked_at IS NULL
      AND (rpm IS NULL
           OR CASE WHEN :now >= req_window + :window THEN 0 ELSE req_used END + 1 <= rpm)
      AND (tpm IS NULL
           OR CASE WHEN :now >= tok_window + :window THEN 0 ELSE tok_used END + :tokens <= tpm)
      AND (budget_nusd IS NULL
           OR CASE WHEN spend_period = :period THEN spent_nusd ELSE 0 END
              + reserved_nusd + :cost <= budget_nusd)
    RETURNING req_window, req_used, tok_window, tok_used
    """
)


@dataclass(frozen=True)
class Admitted:
    """The key's windows right after this request was counted in them."""

    req_window: float
    req_used: int
    tok_window: float
    tok_used: int


def admit(
    conn: Connection,
    *,
    key: KeyRecord,
    request_id: str,
    now: float,
    tokens: int,
    cost_nusd: int,
    ttl_s: float,
) -> Admitted | None:
    """Count REQUEST_ID against KEY's limits and reserve TOKENS and COST_NUSD, atomically;
    None (and nothing changed) if any limit would be exceeded or the key is revoked."""
    period = budget_period_of(key.budget_period, now)
    params = {
        "now": now,
        "window": WINDOW_S,
        "tokens": tokens,
        "cost": cost_nusd,
        "period": period,
        "key_id": key.id,
    }
    row = conn.execute(_ADMIT, params).one_or_none()
    if row is None:
        return None
    admitted = Admitted(**row._mapping)
    conn.execute(
        insert(reservations).values(
            request_id=request_id,
            key_id=key.id,
            tokens=tokens,
            cost_nusd=cost_nusd,
            tok_window=admitted.tok_window,
            expires=now + ttl_s,
        )
    )
    return admitted


_SETTLE_KEY = text(
    """
    UPDATE api_keys SET
        reserved_nusd = reserved_nusd - :reserved_cost,
        spent_nusd = spent_nusd + :cost,
        tok_used = CASE WHEN tok_window <> :tok_window THEN tok_used
                        WHEN tok_used - :reserved_tokens + :tokens < 0 THEN 0
                        ELSE tok_used - :reserved_tokens + :tokens END
    WHERE id = :key_id
    """
)


def settle(conn: Connection, *, request_id: str, key_id: int, tokens: int, cost_nusd: int) -> None:
    """Give REQUEST_ID's reservation back and charge what it used: TOKENS and COST_NUSD.

    Call it in the transaction that appends the request's ledger row, and only when that row
    was new, so a request is charged once. A reservation already released by
    `release_expired` is not given back twice; the cost is still charged.
    """
    held = conn.execute(
        reservations.delete()
        .where(reservations.c.request_id == request_id)
        .returning(reservations.c.tokens, reservations.c.cost_nusd, reservations.c.tok_window)
    ).one_or_none()
    params = {
        "key_id": key_id,
        "cost": cost_nusd,
        "tokens": tokens,
        "reserved_cost": 0 if held is None else held.cost_nusd,
        "reserved_tokens": 0 if held is None else held.tokens,
        "tok_window": -1.0 if held is None else held.tok_window,
    }
    conn.execute(_SETTLE_KEY, params)


def release_expired(conn: Connection, *, now: float) -> int:
    """Release the reservations that expired before NOW (requests that never settled, e.g.
    on a server that was killed); return how many."""
    conn.execute(
        text(
            """
            UPDATE api_keys SET reserved_nusd = reserved_nusd - (
                SELECT coalesce(sum(r.cost_nusd), 0) FROM reservations r
                WHERE r.key_id = api_keys.id AND r.expires < :now)
            WHERE id IN (SELECT key_id FROM reservations WHERE expires < :now)
            """
        ),
        {"now": now},
    )
    return int(conn.execute(reservations.delete().where(reservations.c.expires < now)).rowcount)


def open_reservations(conn: Connection, *, key_id: int | None = None) -> int:
    """How many reservations are held (by KEY_ID's requests, or all)."""
    query = select(reservations.c.request_id)
    if key_id is not None:
        query = query.where(reservations.c.key_id == key_id)
    return len(conn.execute(query).all())
