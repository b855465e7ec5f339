"""Admin routes that show what the chain made (admin keys only): data sets, training runs and
their live metrics, models with their evals, card, price, aliases and lineage, and invoices.

Read-only views of the registry and `$LMFORGE_HOME`, shaped for the dashboard and anything
else that wants JSON; each reads what the matching command reads (`lmforge data show`,
`models show`, `lineage`, `bill`). Names in paths are checked against the registry's name rule
and run ids against their own, so no route can be walked outside `$LMFORGE_HOME`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter

from lmforge.data.report import funnel_rows
from lmforge.errors import LmforgeError
from lmforge.eval.card import CARD_FILE
from lmforge.home import lmforge_home
from lmforge.ops.billing import build_invoice
from lmforge.ops.lineage import model_lineage, read_json_object
from lmforge.ops.pricing import format_price
from lmforge.registry import aliases, evals, repo
from lmforge.registry.ledger import get_price, list_prices
from lmforge.serve.errors import OpenAIError
from lmforge.serve.state import ServerState, State
from lmforge.train.loop import read_metrics

router = APIRouter(prefix="/v1/admin")

_RUN_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
MAX_POINTS = 20_000  # metrics rows returned by one call at most


def _home(state: ServerState) -> Path:
    return state.settings.home or lmforge_home()


@router.get("/datasets")
def datasets(state: State) -> Any:
    with state.registry.connect() as conn:
        records = repo.list_datasets(conn)
    data = []
    for r in records:
        manifest = read_json_object(r.path / "manifest.json")
        try:
            funnel = [
                {"step": step, "documents": docs, "chars": chars, "kept": kept}
                for step, docs, chars, kept in funnel_rows(manifest)
            ]
        except (KeyError, IndexError, TypeError):
            funnel = []
        data.append(
            {
                "name": r.name,
                "tokenizer": r.tokenizer,
                "vocab_size": r.vocab_size,
                "documents": r.documents,
                "tokens": r.tokens,
                "updated_at": r.updated_at,
                "funnel": funnel,
            }
        )
    return {"object": "list", "data": data}


def _run_dir(state: ServerState, run_id: str) -> Path:
    runs = _home(state) / "runs"
    if not _RUN_ID.fullmatch(run_id) or not (runs / run_id / "run.json").is_file():
        raise OpenAIError(404, f"no run {run_id!r}", param="run_id", code="run_not_found")
    return runs / run_id


@router.get("/runs")
def runs(state: State) -> Any:
    root = _home(state) / "runs"
    data = []
    for run_json in root.glob("*/run.json") if root.is_dir() else []:
        rec = read_json_object(run_json)
        result = rec.get("result") if isinstance(rec.get("result"), dict) else {}
        data.append(
            {
                "id": run_json.parent.name,
                "name": rec.get("name"),
                "status": rec.get("status"),
                "updated_at": rec.get("updated_at"),
                "stage": result.get("stage") if result else None,
            }
        )
    data.sort(key=lambda r: str(r["updated_at"] or ""), reverse=True)
    return {"object": "list", "data": data}


@router.get("/runs/{run_id}/metrics")
def run_metrics(state: State, run_id: str, after: int = 0) -> Any:
    """The run's metrics rows with step > AFTER (poll with the last step seen)."""
    run_dir = _run_dir(state, run_id)
    rows = [
        {k: row[k] for k in ("step", "loss", "val_loss", "lr") if k in row}
        for row in read_metrics(run_dir)  # skips a line still being written
        if isinstance(row["step"], int) and row["step"] > after
    ]
    status = read_json_object(run_dir / "run.json").get("status")
    return {"object": "list", "run": run_id, "status": status, "data": rows[-MAX_POINTS:]}


@router.get("/models")
def models(state: State) -> Any:
    with state.registry.connect() as conn:
        records = repo.list_models(conn)
        prices = {p.model: p for p in list_prices(conn)}  # one query, not one per model
        pointed = aliases.list_aliases(conn)
    return {
        "object": "list",
        "data": [
            {
                "name": r.name,
                "version": r.version,
                "parent": r.parent,
                "arch": r.arch,
                "n_params": r.n_params,
                "created_at": r.created_at,
                "price": _price(prices.get(r.name)),
                "aliases": [a.name for a in pointed if a.model == r.name],
            }
            for r in records
        ],
    }


@router.get("/models/{name}")
def model(state: State, name: str) -> Any:
    with state.registry.connect() as conn:
        versions = repo.list_versions(conn, name=name) if repo.NAME_PATTERN.fullmatch(name) else []
        if not versions:
            raise OpenAIError(404, f"no model named {name!r}", param="name", code="model_not_found")
        results = evals.list_evals(conn, model_name=name, limit=200)
        price = get_price(conn, model=name)
        pointed = [a for a in aliases.list_aliases(conn) if a.model == name]
    latest = versions[-1]
    card = latest.path / CARD_FILE
    try:
        lineage = model_lineage(latest.ref, home=_home(state)).to_dict()
    except LmforgeError as exc:
        lineage = {"kind": "model", "label": latest.ref, "missing": str(exc), "children": []}
    return {
        "name": name,
        "versions": [
            {
                "version": v.version,
                "sha256": v.sha256,
                "created_at": v.created_at,
                "parent": v.parent,
            }
            for v in versions
        ],
        "evals": [
            {
                "id": e.id,
                "model": e.model,
                "task": e.task,
                "data": e.data_path,
                "examples": e.examples,
                "metrics": {k: v for k, v in e.metrics.items() if isinstance(v, (int, float))},
                "contamination_rate": e.contamination_rate,
                "created_at": e.created_at,
            }
            for e in results
        ],
        "price": _price(price),
        "aliases": [{"name": a.name, "target": a.target} for a in pointed],
        "card": card.read_text(encoding="utf-8") if card.is_file() else None,
        "lineage": lineage,
    }


def _price(record: Any) -> dict[str, str] | None:
    if record is None:
        return None
    return {
        "input_per_million": format_price(record.input_musd),
        "output_per_million": format_price(record.output_musd),
    }


@router.get("/invoices/{period}")
def invoice(state: State, period: str, key: str | None = None) -> Any:
    try:
        with state.registry.connect() as conn:
            return build_invoice(conn, period=period, key=key).to_dict()
    except LmforgeError as exc:
        raise OpenAIError(400, str(exc), param="period") from None


@router.get("/aliases")
def alias_list(state: State) -> Any:
    with state.registry.connect() as conn:
        found = aliases.list_aliases(conn)
    return {
        "object": "list",
        "data": [{"name": a.name, "target": a.target, "updated_at": a.updated_at} for a in found],
    }
