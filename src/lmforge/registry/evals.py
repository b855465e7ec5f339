"""Evaluation results in the registry: the SQL of the `eval_results` table only.

Each `lmforge eval` run appends one row: the model as the spec resolved (`model`: "sst2@2", a
directory, a built-in name) with its name, directory and weights sha256, the task and data file
(path + sha256), the metrics and the contamination report as JSON, and how long it took. Rows
are history: nothing here updates or deletes one. What a result means (the metrics, the
contamination check) is `eval`'s and `ops.contamination`'s; the model card (`eval/card.py`)
keeps its own copy in `lmforge.json`.

    with engine.begin() as conn:
        row_id = record_eval(conn, model="sst2@2", model_name="sst2", …, metrics={"accuracy": 0.9})
    with engine.connect() as conn:
        latest = list_evals(conn, model_name="sst2", task="classify", limit=5)  # newest first
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, insert, select

from lmforge.errors import LmforgeError
from lmforge.registry.tables import eval_results, utc_now

_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class EvalRecord:
    """One row of `eval_results`: one evaluation of one model on one data file."""

    id: int
    model: str  # the spec as resolved: "sst2@2", a directory, a built-in name
    model_name: str
    model_path: str
    weights_sha256: str | None  # None: not known
    task: str  # "perplexity" | "classify" | "qa" | "bleu"
    data_path: str
    data_sha256: str
    examples: int
    metrics: dict[str, Any]
    contamination_rate: float | None  # the share of examples flagged; None: not checked
    contamination: dict[str, Any] | None  # the report; None: not checked
    seconds: float
    created_at: str  # ISO-8601 UTC


def record_eval(
    conn: Connection,
    *,
    model: str,
    model_name: str,
    model_path: str | Path,
    weights_sha256: str | None,
    task: str,
    data_path: str | Path,
    data_sha256: str,
    examples: int,
    metrics: dict[str, Any],
    contamination_rate: float | None = None,
    contamination: dict[str, Any] | None = None,
    seconds: float,
    created_at: str | None = None,
) -> int:
    """Append one evaluation result and return its id.

    CREATED_AT defaults to now (pass the result's own timestamp to keep the registry and the
    model card in agreement). METRICS and CONTAMINATION must be JSON-serializable; non-finite
    floats are refused (JSON has no NaN).
    """
    if not task:
        raise LmforgeError("an eval result needs a task")
    for what, digest in (("data", data_sha256), ("weights", weights_sha256)):
        if digest is not None and not _SHA256_PATTERN.fullmatch(digest):
            raise LmforgeError(f"invalid {what} sha256 {digest!r}: want 64 lowercase hex digits")
    if examples < 0:
        raise LmforgeError(f"examples must be >= 0, got {examples}")
    if contamination_rate is not None and not 0.0 <= contamination_rate <= 1.0:
        raise LmforgeError(f"contamination rate must be in [0, 1], got {contamination_rate}")
    if not math.isfinite(seconds) or seconds < 0:
        raise LmforgeError(f"seconds must be a finite number >= 0, got {seconds}")
    statement = (
        insert(eval_results)
        .values(
            model=model,
            model_name=model_name,
            model_path=str(model_path),
            weights_sha256=weights_sha256,
            task=task,
            data_path=str(data_path),
            data_sha256=data_sha256,
            examples=examples,
            metrics=_dump("metrics", metrics),
            contamination_rate=contamination_rate,
            contamination=None if contamination is None else _dump("contamination", contamination),
            seconds=seconds,
            created_at=created_at or utc_now(),
        )
        .returning(eval_results.c.id)
    )
    return int(conn.execute(statement).scalar_one())


def list_evals(
    conn: Connection,
    *,
    model_name: str | None = None,
    model_path: str | Path | None = None,
    task: str | None = None,
    limit: int = 100,
) -> list[EvalRecord]:
    """Results of MODEL_NAME / MODEL_PATH / TASK (each filter optional), newest first.

    Newest means most recently recorded; at most LIMIT rows.
    """
    if limit < 1:
        raise LmforgeError(f"limit must be >= 1, got {limit}")
    where: list[ColumnElement[bool]] = []
    if model_name is not None:
        where.append(eval_results.c.model_name == model_name)
    if model_path is not None:
        where.append(eval_results.c.model_path == str(model_path))
    if task is not None:
        where.append(eval_results.c.task == task)
    query = (
        select(eval_results)
        .where(and_(True, *where))
        .order_by(eval_results.c.id.desc())
        .limit(limit)
    )
    return [_record(row._mapping) for row in conn.execute(query)]


def _dump(what: str, value: dict[str, Any]) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise LmforgeError(f"eval result {what} cannot be stored as JSON: {e}") from e


def _record(row: Any) -> EvalRecord:
    contamination = row["contamination"]
    return EvalRecord(
        **{
            **row,
            "metrics": json.loads(row["metrics"]),
            "contamination": None if contamination is None else json.loads(contamination),
        }
    )
