"""`eval_results` (migration 4) and `registry.evals` against real SQLite files in a tmp dir."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, inspect, text

from lmforge.errors import LmforgeError
from lmforge.registry import db
from lmforge.registry.evals import EvalRecord, list_evals, record_eval
from lmforge.registry.migrations import MIGRATIONS, applied_migrations, migrate


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = db.connect(home=tmp_path)
    yield engine
    engine.dispose()


def record(engine: Engine, **overrides: Any) -> int:
    fields: dict[str, Any] = {
        "model": "sst2@1",
        "model_name": "sst2",
        "model_path": "/models/sst2/1",
        "weights_sha256": sha("weights"),
        "task": "classify",
        "data_path": "/data/dev.jsonl",
        "data_sha256": sha("dev"),
        "examples": 872,
        "metrics": {"accuracy": 0.91, "f1": 0.9, "per_label": {"pos": {"f1": 0.92}}},
        "contamination_rate": 0.0,
        "contamination": {"n": 13, "example_rate": 0.0, "complete": True, "sources": []},
        "seconds": 12.3,
    }
    fields.update(overrides)
    with engine.begin() as conn:
        return record_eval(conn, **fields)


def test_migration_4_from_an_empty_database(tmp_path: Path) -> None:
    engine = db.connect(home=tmp_path)
    try:
        assert applied_migrations(engine) == [m.number for m in MIGRATIONS]
        assert 4 in applied_migrations(engine)
        columns = {c["name"] for c in inspect(engine).get_columns("eval_results")}
        assert {"model", "weights_sha256", "metrics", "contamination_rate", "seconds"} <= columns
    finally:
        engine.dispose()


def test_migration_4_on_a_database_at_migration_3_keeps_its_rows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    old = create_engine(url)
    assert migrate(old, MIGRATIONS[:3]) == [1, 2, 3]
    with old.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO models (name, version, path, sha256, created_at)"
                " VALUES ('sst2', 1, '/m', :sha, 'now')"
            ),
            {"sha": sha("w")},
        )
    assert "eval_results" not in inspect(old).get_table_names()
    old.dispose()

    engine = db.connect(url)  # applies migration 4 and those after it
    try:
        assert applied_migrations(engine) == [m.number for m in MIGRATIONS]
        assert "eval_results" in inspect(engine).get_table_names()
        with engine.connect() as conn:
            assert conn.execute(text("SELECT name FROM models")).scalars().all() == ["sst2"]
        row_id = record(engine)
        with engine.connect() as conn:
            assert [r.id for r in list_evals(conn)] == [row_id]
    finally:
        engine.dispose()


def test_record_and_list_round_trip_every_field(engine: Engine) -> None:
    row_id = record(engine, created_at="2026-11-23T10:00:00Z")
    with engine.connect() as conn:
        (row,) = list_evals(conn)
    assert row == EvalRecord(
        id=row_id,
        model="sst2@1",
        model_name="sst2",
        model_path="/models/sst2/1",
        weights_sha256=sha("weights"),
        task="classify",
        data_path="/data/dev.jsonl",
        data_sha256=sha("dev"),
        examples=872,
        metrics={"accuracy": 0.91, "f1": 0.9, "per_label": {"pos": {"f1": 0.92}}},
        contamination_rate=0.0,
        contamination={"n": 13, "example_rate": 0.0, "complete": True, "sources": []},
        seconds=12.3,
        created_at="2026-11-23T10:00:00Z",
    )


def test_not_checked_contamination_and_unknown_weights_are_null(engine: Engine) -> None:
    record(
        engine,
        weights_sha256=None,
        contamination_rate=None,
        contamination=None,
        model_path=Path("/models/x"),
        data_path=Path("/data/x.txt"),
    )
    with engine.connect() as conn:
        (row,) = list_evals(conn)
    assert row.weights_sha256 is None and row.contamination is None
    assert row.contamination_rate is None
    assert (row.model_path, row.data_path) == ("/models/x", "/data/x.txt")
    assert row.created_at.endswith("Z")  # utc_now() by default


def test_list_is_newest_first_filtered_and_limited(engine: Engine) -> None:
    a = record(engine)
    b = record(engine, task="perplexity", metrics={"perplexity": 12.5})
    c = record(engine, model="other", model_name="other", model_path="/models/other")
    d = record(engine, model="sst2@2", model_path="/models/sst2/2")
    with engine.connect() as conn:
        assert [r.id for r in list_evals(conn)] == [d, c, b, a]
        assert [r.id for r in list_evals(conn, model_name="sst2")] == [d, b, a]
        assert [r.id for r in list_evals(conn, model_name="sst2", task="classify")] == [d, a]
        assert [r.id for r in list_evals(conn, model_path="/models/sst2/1")] == [b, a]
        assert [r.id for r in list_evals(conn, model_path=Path("/models/other"))] == [c]
        assert [r.id for r in list_evals(conn, task="qa")] == []
        assert [r.id for r in list_evals(conn, limit=2)] == [d, c]
        with pytest.raises(LmforgeError, match="limit"):
            list_evals(conn, limit=0)


def test_a_failed_transaction_records_nothing(engine: Engine) -> None:
    with pytest.raises(RuntimeError), engine.begin() as conn:
        record_eval(
            conn,
            model="m",
            model_name="m",
            model_path="/m",
            weights_sha256=None,
            task="qa",
            data_path="/d",
            data_sha256=sha("d"),
            examples=1,
            metrics={"exact_match": 1.0},
            seconds=0.1,
        )
        raise RuntimeError("roll back")
    with engine.connect() as conn:
        assert list_evals(conn) == []


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"data_sha256": "nothex"}, "data sha256"),
        ({"weights_sha256": "A" * 64}, "weights sha256"),
        ({"examples": -1}, "examples"),
        ({"contamination_rate": 1.5}, "contamination rate"),
        ({"seconds": float("nan")}, "seconds"),
        ({"metrics": {"perplexity": float("inf")}}, "JSON"),
        ({"metrics": {"bad": object()}}, "JSON"),
        ({"task": ""}, "task"),
    ],
)
def test_bad_fields_are_refused_and_nothing_is_written(
    engine: Engine, overrides: dict[str, Any], match: str
) -> None:
    with pytest.raises(LmforgeError, match=match):
        record(engine, **overrides)
    with engine.connect() as conn:
        assert list_evals(conn) == []
