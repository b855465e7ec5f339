"""Eval-gated promotion: point an alias at a model version only if its recorded evals pass.

A requirement is `METRIC OP NUMBER` (`perplexity<12`, `accuracy>=0.85`; OP is one of < <= > >=
== !=). It is checked against the newest recorded eval (`lmforge eval`, stored in the
registry) of that exact version that has METRIC; a version with no such eval fails the check,
so promotion never passes on a result that does not exist. What each check found is stored with
the promotion (and in the audit log).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine

from lmforge.errors import LmforgeError
from lmforge.registry import aliases, evals, repo

_REQUIREMENT = re.compile(
    r"^\s*(?P<metric>[A-Za-z_][A-Za-z0-9_.]*)\s*(?P<op><=|>=|==|!=|<|>)\s*(?P<value>[^\s]+)\s*$"
)
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


@dataclass(frozen=True)
class Requirement:
    metric: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_requirement(text: str) -> Requirement:
    m = _REQUIREMENT.match(text)
    if m is None:
        raise LmforgeError(f"--require {text!r}: want METRIC OP NUMBER, e.g. 'perplexity<12'")
    try:
        value = float(m["value"])
    except ValueError:
        raise LmforgeError(f"--require {text!r}: {m['value']!r} is not a number") from None
    if not math.isfinite(value):
        raise LmforgeError(f"--require {text!r}: the bound must be a finite number")
    return Requirement(m["metric"], m["op"], value)


def check_requirements(
    conn: Any, record: repo.ModelRecord, requirements: list[Requirement]
) -> list[dict[str, Any]]:
    """One dict per requirement: what was found and whether it passed (in order)."""
    found = [
        r
        for r in evals.list_evals(conn, model_name=record.name, limit=1000)
        if r.model == record.ref or r.model_path == str(record.path)
    ]
    checks = []
    for req in requirements:
        match = next(
            (
                r
                for r in found
                if isinstance(r.metrics.get(req.metric), (int, float))
                and not isinstance(r.metrics.get(req.metric), bool)
            ),
            None,
        )
        if match is None:
            known = sorted({k for r in found for k in r.metrics})
            checks.append(
                {
                    "require": str(req),
                    "passed": False,
                    "why": f"no recorded eval of {record.ref} has {req.metric!r}"
                    + (f" (recorded: {', '.join(known)})" if known else " (run lmforge eval)"),
                }
            )
            continue
        value = float(match.metrics[req.metric])
        passed = _OPS[req.op](value, req.value)
        checks.append(
            {
                "require": str(req),
                "passed": passed,
                "value": value,
                "eval_id": match.id,
                "task": match.task,
                "data": match.data_path,
                "why": f"{req.metric} {value:.6g} on {match.data_path} (eval {match.id})",
            }
        )
    return checks


def promote_model(
    engine: Engine, *, actor: str, spec: str, alias: str, requires: list[str]
) -> tuple[aliases.Alias, list[dict[str, Any]]]:
    """Point ALIAS at the registry model SPEC (`name` = newest, or `name@N`) if every
    requirement passes; (the alias, the checks). Refused in one line otherwise."""
    requirements = [parse_requirement(r) for r in requires]
    name, _, version = spec.partition("@")
    if version and not version.isdigit():
        raise LmforgeError(f"{spec!r}: want a registry name or name@VERSION")
    with engine.connect() as conn:  # reads; evals are append-only, so they hold until the write
        record = repo.get_model(conn, name=name, version=int(version) if version else None)
        if record is None:
            raise LmforgeError(f"no registry model {spec!r} (see lmforge models list)")
        checks = check_requirements(conn, record, requirements)
    failed = [c for c in checks if not c["passed"]]
    if failed:
        raise LmforgeError(
            f"{record.ref} not promoted to {alias}: "
            + "; ".join(f"{c['require']} fails: {c['why']}" for c in failed)
        )
    with engine.begin() as conn:
        result = aliases.promote(
            conn, name=alias, model=record.name, version=record.version, actor=actor, checks=checks
        )
    return result, checks


def rollback_alias(engine: Engine, *, actor: str, alias: str) -> aliases.Alias:
    with engine.begin() as conn:
        return aliases.rollback(conn, name=alias, actor=actor)
