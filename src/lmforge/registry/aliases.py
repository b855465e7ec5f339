"""Aliases: a stable name (`prod`) that points at one exact model version, and its history.

`promote` points an alias at `model@version` and appends an event recording where it pointed
before; `rollback` takes back the newest promotion still in force (the alias points where it
pointed before that promotion, and the promotion is marked undone), so repeated rollbacks walk
back through the promotions one by one. Both write the alias, its event and the audit entry in
the caller's transaction. Servers serving an alias read `get_alias` to follow it.

An alias may not share a name with a registry model (`resolve` looks models up first).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, insert, select, update

from lmforge.errors import LmforgeError
from lmforge.registry import dialects
from lmforge.registry.audit import record_audit
from lmforge.registry.repo import validate_name
from lmforge.registry.tables import alias_events, aliases, models, utc_now


@dataclass(frozen=True)
class Alias:
    name: str
    model: str
    version: int
    updated_at: str

    @property
    def target(self) -> str:
        return f"{self.model}@{self.version}"


@dataclass(frozen=True)
class AliasEvent:
    id: int
    alias: str
    action: str  # "promote" | "rollback"
    from_target: str | None  # "model@version" before; None: the alias's first promotion
    to_target: str
    undone: bool
    checks: list[dict[str, Any]]
    actor: str
    created_at: str


def get_alias(conn: Connection, *, name: str) -> Alias | None:
    row = conn.execute(select(aliases).where(aliases.c.name == name)).first()
    return None if row is None else Alias(row.name, row.model, row.version, row.updated_at)


def list_aliases(conn: Connection) -> list[Alias]:
    rows = conn.execute(select(aliases).order_by(aliases.c.name))
    return [Alias(r.name, r.model, r.version, r.updated_at) for r in rows]


def alias_history(conn: Connection, *, name: str, limit: int = 50) -> list[AliasEvent]:
    """NAME's events, newest first."""
    query = (
        select(alias_events)
        .where(alias_events.c.alias == name)
        .order_by(alias_events.c.id.desc())
        .limit(limit)
    )
    return [_event(r._mapping) for r in conn.execute(query)]


def promote(
    conn: Connection,
    *,
    name: str,
    model: str,
    version: int,
    actor: str,
    checks: list[dict[str, Any]] | None = None,
) -> Alias:
    """Point alias NAME at MODEL@VERSION (which must be registered); CHECKS are recorded."""
    validate_name(name, kind="alias")
    now = utc_now()
    _lock(conn, name)
    before = get_alias(conn, name=name)
    exists = conn.execute(
        select(models.c.id).where(models.c.name == model, models.c.version == version)
    ).first()
    if exists is None:
        raise LmforgeError(f"model {model}@{version} is not in the registry")
    if conn.execute(select(models.c.id).where(models.c.name == name)).first() is not None:
        raise LmforgeError(f"{name!r} is a model's name; an alias needs a name of its own")
    conn.execute(
        dialects.insert(conn, aliases)
        .values(name=name, model=model, version=version, updated_at=now)
        .on_conflict_do_update(
            index_elements=[aliases.c.name],
            set_={"model": model, "version": version, "updated_at": now},
        )
    )
    conn.execute(
        insert(alias_events).values(
            alias=name,
            action="promote",
            from_model=None if before is None else before.model,
            from_version=None if before is None else before.version,
            to_model=model,
            to_version=version,
            undone=0,
            checks=json.dumps(checks or []),
            actor=actor,
            created_at=now,
        )
    )
    record_audit(
        conn,
        actor=actor,
        action="alias.promote",
        target=name,
        details={
            "from": None if before is None else before.target,
            "to": f"{model}@{version}",
            "checks": checks or [],
        },
    )
    return Alias(name, model, version, now)


def rollback(conn: Connection, *, name: str, actor: str) -> Alias:
    """Take back alias NAME's newest promotion still in force; the alias after it."""
    _lock(conn, name)
    current = get_alias(conn, name=name)
    if current is None:
        raise LmforgeError(f"no alias named {name!r} (see lmforge models aliases)")
    last = conn.execute(
        select(alias_events)
        .where(
            alias_events.c.alias == name,
            alias_events.c.action == "promote",
            alias_events.c.undone == 0,
        )
        .order_by(alias_events.c.id.desc())
        .limit(1)
    ).first()
    if last is None or last.from_model is None:
        raise LmforgeError(
            f"{name} has nothing to roll back to: it points at {current.target}, its first "
            "promotion"
        )
    now = utc_now()
    conn.execute(update(alias_events).where(alias_events.c.id == last.id).values(undone=1))
    conn.execute(
        update(aliases)
        .where(aliases.c.name == name)
        .values(model=last.from_model, version=last.from_version, updated_at=now)
    )
    conn.execute(
        insert(alias_events).values(
            alias=name,
            action="rollback",
            from_model=current.model,
            from_version=current.version,
            to_model=last.from_model,
            to_version=last.from_version,
            undone=0,
            checks=None,
            actor=actor,
            created_at=now,
        )
    )
    target = f"{last.from_model}@{last.from_version}"
    record_audit(
        conn,
        actor=actor,
        action="alias.rollback",
        target=name,
        details={"from": current.target, "to": target},
    )
    return Alias(name, last.from_model, last.from_version, now)


def _lock(conn: Connection, name: str) -> None:
    """Start the transaction with a write (a no-op UPDATE still takes SQLite's write lock; on
    PostgreSQL an advisory lock per alias), so what it reads next cannot change under it
    before it commits (see `repo`)."""
    dialects.serialize(conn, f"alias:{name}")
    conn.execute(
        update(aliases).where(aliases.c.name == name).values(updated_at=aliases.c.updated_at)
    )


def _event(row: Any) -> AliasEvent:
    before = None if row["from_model"] is None else f"{row['from_model']}@{row['from_version']}"
    return AliasEvent(
        id=row["id"],
        alias=row["alias"],
        action=row["action"],
        from_target=before,
        to_target=f"{row['to_model']}@{row['to_version']}",
        undone=bool(row["undone"]),
        checks=json.loads(row["checks"]) if row["checks"] else [],
        actor=row["actor"],
        created_at=row["created_at"],
    )
