"""registry.keys: admission windows, reservations and settlement, against a real SQLite file
(and a real PostgreSQL under `make test-pg`)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from sqlalchemy import Engine

from lmforge.errors import LmforgeError
from lmforge.registry import keys as k
from lmforge.registry.db import connect
from lmforge.registry.ledger import record_usage


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return connect(home=tmp_path)


def _key(engine: Engine, name: str = "k", **limits: object) -> k.KeyRecord:
    with engine.begin() as conn:
        record, _ = k.create_key(conn, name=name, **limits)  # type: ignore[arg-type]
    return record


def _admit(engine: Engine, key: k.KeyRecord, rid: str, now: float, tokens: int = 0, cost: int = 0):  # type: ignore[no-untyped-def]
    with engine.begin() as conn:
        return k.admit(
            conn, key=key, request_id=rid, now=now, tokens=tokens, cost_nusd=cost, ttl_s=60
        )


def test_find_key_matches_only_the_whole_key(engine: Engine) -> None:
    with engine.begin() as conn:
        record, key = k.create_key(conn, name="a")
        assert k.find_key(conn, key=key) == record
        assert k.find_key(conn, key=key[:-1] + ("A" if key[-1] != "A" else "B")) is None
        assert k.find_key(conn, key=key[:12]) is None
        assert k.find_key(conn, key=key + "x") is None


def test_requests_window_opens_at_the_first_request_and_resets_after_a_minute(
    engine: Engine,
) -> None:
    key = _key(engine, rpm=2)
    assert _admit(engine, key, "r1", 1000.0) is not None
    assert _admit(engine, key, "r2", 1030.0) is not None
    assert _admit(engine, key, "r3", 1059.9) is None  # still the window opened at 1000
    third = _admit(engine, key, "r4", 1060.0)  # a new window
    assert third is not None and (third.req_window, third.req_used) == (1060.0, 1)


def test_tokens_reserved_are_settled_to_what_was_used(engine: Engine) -> None:
    key = _key(engine, tpm=100)
    assert _admit(engine, key, "a", 10.0, tokens=80) is not None
    assert _admit(engine, key, "b", 11.0, tokens=30) is None  # 80 + 30 > 100
    with engine.begin() as conn:
        k.settle(conn, request_id="a", key_id=key.id, tokens=20, cost_nusd=0)
    assert _admit(engine, key, "b", 12.0, tokens=30) is not None  # 20 + 30 <= 100
    with engine.connect() as conn:
        assert k.get_key(conn, name="k").tok_used == 50  # type: ignore[union-attr]


def test_budget_counts_reservations_and_settles_actual_cost(engine: Engine) -> None:
    key = _key(engine, budget_nusd=1000)
    assert _admit(engine, key, "a", 1.0, cost=600) is not None
    assert _admit(engine, key, "b", 1.0, cost=600) is None  # 600 reserved + 600 > 1000
    with engine.begin() as conn:
        k.settle(conn, request_id="a", key_id=key.id, tokens=0, cost_nusd=250)
        record = k.get_key(conn, name="k")
    assert record is not None and (record.spent_nusd, record.reserved_nusd) == (250, 0)
    assert _admit(engine, key, "b", 2.0, cost=750) is not None
    assert _admit(engine, key, "c", 2.0, cost=1) is None


def test_monthly_budget_starts_again_in_a_new_month(engine: Engine) -> None:
    key = _key(engine, budget_nusd=100, budget_period="month")
    nov, dec = 1_795_000_000.0, 1_797_000_000.0  # 2026-11-18 and 2026-12-11 (UTC)
    assert _admit(engine, key, "a", nov, cost=100) is not None
    with engine.begin() as conn:
        k.settle(conn, request_id="a", key_id=key.id, tokens=0, cost_nusd=100)
    assert _admit(engine, key, "b", nov + 1, cost=1) is None
    assert _admit(engine, key, "c", dec, cost=100) is not None


def test_expired_reservations_are_released_once(engine: Engine) -> None:
    key = _key(engine, budget_nusd=100)
    assert _admit(engine, key, "lost", 0.0, cost=100) is not None  # ttl 60 s: expires at 60
    with engine.begin() as conn:
        assert k.release_expired(conn, now=30.0) == 0
        assert k.release_expired(conn, now=61.0) == 1
        assert k.open_reservations(conn) == 0
        assert k.get_key(conn, name="k").reserved_nusd == 0  # type: ignore[union-attr]
        # A late settlement still charges its cost but returns nothing twice.
        k.settle(conn, request_id="lost", key_id=key.id, tokens=0, cost_nusd=40)
        assert k.get_key(conn, name="k").reserved_nusd == 0  # type: ignore[union-attr]
        assert k.get_key(conn, name="k").spent_nusd == 40  # type: ignore[union-attr]


def test_a_revoked_key_is_never_admitted(engine: Engine) -> None:
    key = _key(engine)
    with engine.begin() as conn:
        k.revoke_key(conn, name="k")
        with pytest.raises(LmforgeError, match="revoked"):
            k.revoke_key(conn, name="k")
    assert _admit(engine, key, "r", 1.0) is None


def test_the_ledger_refuses_changes_and_duplicates(engine: Engine) -> None:
    with engine.begin() as conn:
        row = dict(
            request_id="r",
            key_id=None,
            endpoint="/x",
            model=None,
            model_version=None,
            prompt_tokens=1,
            completion_tokens=1,
            ttft_ms=None,
            latency_ms=1.0,
            status="ok",
            http_status=200,
            cost_nusd=5,
            price_input=None,
            price_output=None,
        )
        assert record_usage(conn, **row) is True  # type: ignore[arg-type]
        assert record_usage(conn, **row) is False  # type: ignore[arg-type]
    for statement in ("UPDATE usage SET cost_nusd = 0", "DELETE FROM usage"):
        with pytest.raises(Exception, match="append-only"), engine.begin() as conn:
            conn.exec_driver_sql(statement)


def _admit_in_process(home: str, key_name: str, count: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    import time

    engine = connect(home=Path(home))  # the test's registry: SQLite, or PostgreSQL by $LMFORGE_DB
    with engine.connect() as conn:
        key = k.get_key(conn, name=key_name)
    assert key is not None
    ok = 0
    for i in range(count):
        with engine.begin() as conn:
            rid = f"{multiprocessing.current_process().pid}-{i}"
            ok += (
                k.admit(
                    conn, key=key, request_id=rid, now=time.time(), tokens=0, cost_nusd=0, ttl_s=60
                )
                is not None
            )
    out.put(ok)


def test_four_processes_share_one_requests_window(engine: Engine, tmp_path: Path) -> None:
    _key(engine, "shared", rpm=25)
    queue: multiprocessing.Queue[int] = multiprocessing.Queue()
    procs = [
        multiprocessing.Process(target=_admit_in_process, args=(str(tmp_path), "shared", 20, queue))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sum(queue.get(timeout=5) for _ in procs) == 25
