"""All of moderation's SQL: versioned rule sets and per-scope policies (migration 3's tables).

Same conventions as `repo`: keyword-only functions over a `Connection`, frozen dataclasses, the
caller owns the transaction. Every change is audited (`audit.record_audit`) in that transaction.

Rule sets are versioned and immutable: `add_rule` and `remove_rule` write version N+1 in full (a
copy of version N's rules plus or minus the change), so a verdict can name the exact rules it was
made under and old versions stay readable. The new version is computed inside the INSERT of its
`moderation_rulesets` row (`max(version) + 1`), which is also the transaction's first statement:
it takes SQLite's write lock before anything is read, so concurrent writers queue up and each
copies the version right below its own.

    with engine.begin() as conn:
        ruleset = add_rule(conn, category="hate", kind="word", pattern="…", actor="cli:alice")
    with engine.connect() as conn:
        policy = effective_policy(conn, key="team-a", model="smollm2-135m-instruct")

Policies say what moderation does per direction (`input`: the request, `output`: the model's
answer): `off`, `flag` (check and report) or `block` (check and refuse). Scopes are `default`,
`key:<key name>` and `model:<model name>`; a key's policy beats a model's, which beats the
default; with none at all moderation is off.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, case, func, insert, literal, select

from lmforge.errors import LmforgeError
from lmforge.registry import dialects
from lmforge.registry.audit import record_audit
from lmforge.registry.tables import (
    moderation_policies,
    moderation_rules,
    moderation_rulesets,
    utc_now,
)

CATEGORY_PATTERN = re.compile(r"[a-z][a-z0-9_/-]{0,39}")
RULE_KINDS = ("word", "regex")
MAX_PATTERN_CHARS = 500
POLICY_ACTIONS = ("off", "flag", "block")
DEFAULT_SCOPE = "default"


@dataclass(frozen=True)
class Rule:
    """One row of `moderation_rules`: a rule of ruleset VERSION."""

    id: int  # unique across versions: a copied rule gets a new id in each version
    version: int
    category: str  # "hate", "violence/graphic", "spam", …
    kind: str  # "word" | "regex"
    pattern: str
    created_at: str  # when the rule was first added (copies keep it), ISO-8601 UTC


@dataclass(frozen=True)
class Ruleset:
    """Version VERSION of the rules (0 and no rules before the first change)."""

    version: int
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class Policy:
    """One row of `moderation_policies`, or the built-in off/off when no row applies."""

    scope: str  # "default", "key:<key name>" or "model:<model name>"
    input: str  # "off" | "flag" | "block"
    output: str
    updated_at: str | None  # None: no row, the built-in default


# -- rule sets ---------------------------------------------------------------------------------


def latest_version(conn: Connection) -> int:
    """The newest ruleset version, 0 when there is none (one indexed read: cheap per request)."""
    query = select(func.coalesce(func.max(moderation_rulesets.c.version), 0))
    return int(conn.execute(query).scalar_one())


def get_ruleset(conn: Connection, *, version: int) -> Ruleset | None:
    """Ruleset VERSION, or None if there is no such version (version 0 is the empty one)."""
    if version == 0:
        return Ruleset(version=0, rules=())
    exists = select(moderation_rulesets.c.version).where(moderation_rulesets.c.version == version)
    if conn.execute(exists).one_or_none() is None:
        return None
    query = (
        select(moderation_rules)
        .where(moderation_rules.c.version == version)
        .order_by(moderation_rules.c.id)
    )
    return Ruleset(version=version, rules=tuple(_rule(row._mapping) for row in conn.execute(query)))


def current_ruleset(conn: Connection) -> Ruleset:
    """The newest ruleset; version 0 with no rules when none was ever written."""
    ruleset = get_ruleset(conn, version=latest_version(conn))
    assert ruleset is not None  # the latest version exists by definition
    return ruleset


def validate_rule(*, category: str, kind: str, pattern: str) -> str:
    """Raise `LmforgeError` naming what is wrong with the rule; return the pattern to store
    (a word's surrounding whitespace is dropped)."""
    if not CATEGORY_PATTERN.fullmatch(category):
        raise LmforgeError(
            f"invalid category {category!r}: use 1-40 of a-z 0-9 _ / - starting with a-z"
        )
    if kind not in RULE_KINDS:
        raise LmforgeError(f"invalid rule kind {kind!r}: use one of {', '.join(RULE_KINDS)}")
    if kind == "word":
        pattern = pattern.strip()
    if not pattern:
        raise LmforgeError(f"empty {kind} pattern")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise LmforgeError(
            f"{kind} pattern is {len(pattern)} characters long; at most {MAX_PATTERN_CHARS}"
        )
    if kind == "regex":
        try:
            compiled = re.compile(pattern, re.IGNORECASE)
        except re.error as e:
            raise LmforgeError(f"invalid regex {pattern!r}: {e}") from None
        if compiled.search("") is not None:
            raise LmforgeError(
                f"regex {pattern!r} matches the empty string, so it would flag every text"
            )
    return pattern


def add_rule(conn: Connection, *, category: str, kind: str, pattern: str, actor: str) -> Ruleset:
    """Write ruleset N+1 = ruleset N plus the rule; return it. A rule that version N already
    has (same category, kind and pattern) is an error."""
    pattern = validate_rule(category=category, kind=kind, pattern=pattern)
    version = _new_version(conn, actor=actor)
    for rule in _rules_of(conn, version=version - 1):
        if (rule.category, rule.kind, rule.pattern) == (category, kind, pattern):
            raise LmforgeError(
                f"ruleset {version - 1} already has rule {rule.id}: {category} {kind} {pattern!r}"
            )
    _copy_rules(conn, version=version, skip_id=None)
    rule_id = conn.execute(
        insert(moderation_rules)
        .values(
            version=version, category=category, kind=kind, pattern=pattern, created_at=utc_now()
        )
        .returning(moderation_rules.c.id)
    ).scalar_one()
    details = {"version": version, "rule_id": rule_id, "kind": kind, "pattern": pattern}
    record_audit(conn, actor=actor, action="moderation.rule_add", target=category, details=details)
    return _ruleset(conn, version=version)


def remove_rule(
    conn: Connection,
    *,
    actor: str,
    rule_id: int | None = None,
    category: str | None = None,
    pattern: str | None = None,
) -> Ruleset:
    """Write ruleset N+1 = ruleset N without one rule, named by RULE_ID (an id of version N, as
    `current_ruleset` lists them) or by CATEGORY and PATTERN; return it."""
    if (rule_id is None) == (category is None or pattern is None):
        raise LmforgeError("name the rule to remove by its id, or by its category and pattern")
    version = _new_version(conn, actor=actor)
    previous = _rules_of(conn, version=version - 1)
    if rule_id is not None:
        found = [rule for rule in previous if rule.id == rule_id]
        what = f"id {rule_id}"
    else:
        assert pattern is not None
        found = [
            rule
            for rule in previous
            if rule.category == category and rule.pattern in (pattern, pattern.strip())
        ]
        what = f"category {category!r} and pattern {pattern!r}"
    if not found:
        raise LmforgeError(f"ruleset {version - 1} has no rule with {what}")
    removed = found[0]
    _copy_rules(conn, version=version, skip_id=removed.id)
    details = {
        "version": version,
        "rule_id": removed.id,
        "kind": removed.kind,
        "pattern": removed.pattern,
    }
    record_audit(
        conn,
        actor=actor,
        action="moderation.rule_remove",
        target=removed.category,
        details=details,
    )
    return _ruleset(conn, version=version)


def _new_version(conn: Connection, *, actor: str) -> int:
    """Insert the next ruleset row (max + 1, computed by the database) and return its version.

    It is the transaction's first statement: from here to the commit no other writer of rule
    sets runs (see `dialects.serialize`), so version - 1 is still the newest when it commits."""
    dialects.serialize(conn, "moderation_rulesets")
    next_version = select(
        func.coalesce(func.max(moderation_rulesets.c.version), 0) + 1
    ).scalar_subquery()
    statement = (
        insert(moderation_rulesets)
        .values(version=next_version, actor=actor, created_at=utc_now())
        .returning(moderation_rulesets.c.version)
    )
    return int(conn.execute(statement).scalar_one())


def _copy_rules(conn: Connection, *, version: int, skip_id: int | None) -> None:
    """Copy version-1's rules (but SKIP_ID) into VERSION, in order, in one statement."""
    source = select(
        literal(version),
        moderation_rules.c.category,
        moderation_rules.c.kind,
        moderation_rules.c.pattern,
        moderation_rules.c.created_at,
    ).where(moderation_rules.c.version == version - 1)
    if skip_id is not None:
        source = source.where(moderation_rules.c.id != skip_id)
    columns = ["version", "category", "kind", "pattern", "created_at"]
    conn.execute(
        insert(moderation_rules).from_select(columns, source.order_by(moderation_rules.c.id))
    )


def _rules_of(conn: Connection, *, version: int) -> tuple[Rule, ...]:
    ruleset = get_ruleset(conn, version=version)
    return () if ruleset is None else ruleset.rules


def _ruleset(conn: Connection, *, version: int) -> Ruleset:
    ruleset = get_ruleset(conn, version=version)
    assert ruleset is not None
    return ruleset


def _rule(row: Any) -> Rule:
    return Rule(**row)


# -- policies ----------------------------------------------------------------------------------


def validate_scope(scope: str) -> str:
    """Return SCOPE if it is `default`, `key:<name>` or `model:<name>`, else raise."""
    kind, sep, name = scope.partition(":")
    if scope == DEFAULT_SCOPE or (sep and kind in ("key", "model") and name.strip() == name != ""):
        return scope
    raise LmforgeError(f"invalid policy scope {scope!r}: use default, key:<name> or model:<name>")


def set_policy(conn: Connection, *, scope: str, input: str, output: str, actor: str) -> Policy:
    """Create or replace SCOPE's policy (one upsert) and audit it as `policy.set`."""
    validate_scope(scope)
    for direction, action in (("input", input), ("output", output)):
        if action not in POLICY_ACTIONS:
            raise LmforgeError(
                f"{direction} must be one of {', '.join(POLICY_ACTIONS)}, got {action!r}"
            )
    values = {"input": input, "output": output, "updated_at": utc_now()}
    statement = (
        dialects.insert(conn, moderation_policies)
        .values(scope=scope, **values)
        .on_conflict_do_update(index_elements=[moderation_policies.c.scope], set_=values)
        .returning(*moderation_policies.c)
    )
    policy = Policy(**conn.execute(statement).one()._mapping)
    record_audit(
        conn,
        actor=actor,
        action="policy.set",
        target=scope,
        details={"kind": "moderation", "input": input, "output": output},
    )
    return policy


def list_policies(conn: Connection) -> list[Policy]:
    """Every policy row: the default first, then keys, then models, each sorted by name."""
    order = case(
        (moderation_policies.c.scope == DEFAULT_SCOPE, 0),
        (moderation_policies.c.scope.startswith("key:"), 1),
        else_=2,
    )
    query = select(moderation_policies).order_by(order, moderation_policies.c.scope)
    return [Policy(**row._mapping) for row in conn.execute(query)]


def effective_policy(conn: Connection, *, key: str | None, model: str | None) -> Policy:
    """The policy for a request by key KEY (its name) to MODEL: KEY's scope beats MODEL's
    beats the default; off/off (scope "default", `updated_at` None) when none is set."""
    scopes = [DEFAULT_SCOPE]
    if key is not None:
        scopes.append(f"key:{key}")
    if model is not None:
        scopes.append(f"model:{model}")
    rank = case(
        (moderation_policies.c.scope.startswith("key:"), 0),
        (moderation_policies.c.scope.startswith("model:"), 1),
        else_=2,
    )
    query = (
        select(moderation_policies)
        .where(moderation_policies.c.scope.in_(scopes))
        .order_by(rank)
        .limit(1)
    )
    row = conn.execute(query).one_or_none()
    if row is None:
        return Policy(scope=DEFAULT_SCOPE, input="off", output="off", updated_at=None)
    return Policy(**row._mapping)
