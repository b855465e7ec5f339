"""The audit log of admin actions: who did what to which target, when. Append-only (triggers
refuse UPDATE and DELETE). Write the entry in the same transaction as the change it records,
so there is never a change without its entry or an entry without its change."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, insert, select

from lmforge.registry.tables import audit_log, utc_now


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: str  # ISO-8601 UTC
    actor: str  # "cli:<os user>" or "key:<key name>"
    action: str  # "key.create", "key.update", "key.revoke", "price.set", "policy.set", …
    target: str | None  # what it was done to: a key name, a model name, a policy scope
    details: dict[str, Any]


def record_audit(
    conn: Connection,
    *,
    actor: str,
    action: str,
    target: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """Append one entry. DETAILS must hold no secret (it is shown to every admin)."""
    conn.execute(
        insert(audit_log).values(
            at=utc_now(),
            actor=actor,
            action=action,
            target=target,
            details=json.dumps(details or {}, sort_keys=True),
        )
    )


def list_audit(
    conn: Connection,
    *,
    action: str | None = None,
    target: str | None = None,
    since: str | None = None,
    limit: int | None = None,
) -> list[AuditEntry]:
    """Entries, oldest first, filtered by ACTION prefix ("key." matches all key actions)."""
    query = select(audit_log).order_by(audit_log.c.id)
    if action is not None:
        query = query.where(audit_log.c.action.startswith(action, autoescape=True))
    if target is not None:
        query = query.where(audit_log.c.target == target)
    if since is not None:
        query = query.where(audit_log.c.at >= since)
    if limit is not None:
        query = query.order_by(None).order_by(audit_log.c.id.desc()).limit(limit)
    rows = [
        AuditEntry(**{**row._mapping, "details": json.loads(row.details or "{}")})
        for row in conn.execute(query)
    ]
    return sorted(rows, key=lambda e: e.id)
