"""Metering end to end on a real server: ledger = Prometheus counters = invoice after a mixed
load with streams cancelled midway; moderation policies; request lineage; SIGKILL survival."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from served import Server, create_key, make_model_dir, start_server, stop_server

import pgtest
from lmforge.cli.main import main

KILL_TRIALS = int(os.environ.get("LMFORGE_KILL_TRIALS", "10"))  # make reliability: 100


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def ledger(home: Path, query: str, *args: Any) -> list[tuple[Any, ...]]:
    return pgtest.query(home, query, *args)


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Iterator[Server]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("metering")
    # Wider and longer than the usual tiny model, so that a 400-token stream takes long enough
    # (about a second) to be cancelled midway.
    model_dir = make_model_dir(root, tiny_tokenizer, d_model=256, n_layer=4, max_seq_len=512)
    server = start_server(model_dir, root / "home", "--max-batch", "4")
    r = httpx.put(
        f"{server.url}/v1/admin/prices/{server.model}",
        json={"input": "1234.5", "output": "3000.25"},  # big enough that cents matter
        headers=server.headers,
    )
    assert r.status_code == 200, r.text
    yield server
    stop_server(server)


def _wait_for_rows(home: Path, ids: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        marks = ",".join("?" * len(ids))
        (count,) = ledger(home, f"SELECT count(*) FROM usage WHERE request_id IN ({marks})", *ids)[
            0
        ]
        if count == len(ids):
            return
        assert time.monotonic() < deadline, f"{count} of {len(ids)} requests in the ledger"
        time.sleep(0.05)


def test_ledger_equals_metrics_equals_invoice_after_mixed_load(
    metered: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    s = metered
    key = create_key(s.home, "mixed")
    ids: list[str] = []
    streamed_usage: dict[str, dict[str, int]] = {}
    with httpx.Client(base_url=s.url, headers=bearer(key), timeout=120) as c:
        for max_tokens in (1, 3, 7, 12, 20, 2):
            r = c.post(
                "/v1/completions",
                json={"model": s.model, "prompt": "to be", "max_tokens": max_tokens, "seed": 1},
            )
            assert r.status_code == 200
            ids.append(r.headers["x-request-id"])
        r = c.post(
            "/v1/completions",
            json={"model": s.model, "prompt": ["a", "b c"], "max_tokens": 5, "n": 2},
        )
        ids.append(r.headers["x-request-id"])
        r = c.post("/v1/embeddings", json={"model": s.model, "input": ["x y", "z"]})
        ids.append(r.headers["x-request-id"])
        for i in range(4):  # streamed to the end, with usage
            body = {
                "model": s.model,
                "messages": [{"role": "user", "content": f"hi {i}"}],
                "max_tokens": 6 + i,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                rid = r.headers["x-request-id"]
                chunks = [line for line in r.iter_lines() if line.startswith("data: ")]
            assert chunks[-1] == "data: [DONE]"
            streamed_usage[rid] = json.loads(chunks[-2][6:])["usage"]
            ids.append(rid)
        cancelled = []
        for _ in range(4):  # cancelled after the first pieces
            body = {
                "model": s.model,
                "prompt": "once",
                "max_tokens": 400,
                "ignore_eos": True,
                "stream": True,
            }
            with c.stream("POST", "/v1/completions", json=body) as r:
                rid = r.headers["x-request-id"]
                lines = r.iter_lines()
                for _ in range(3):
                    next(lines)
            cancelled.append(rid)
        ids += cancelled
    limited = create_key(s.home, "mixed-limited", rpm=1)
    codes = [
        httpx.post(
            f"{s.url}/v1/completions",
            json={"model": s.model, "prompt": "x", "max_tokens": 1},
            headers=bearer(limited),
        )
        for _ in range(2)
    ]
    assert [r.status_code for r in codes] == [200, 429]
    ids += [r.headers["x-request-id"] for r in codes]

    _wait_for_rows(s.home, ids)
    for rid, use in streamed_usage.items():
        row = ledger(
            s.home, "SELECT prompt_tokens, completion_tokens FROM usage WHERE request_id = ?", rid
        )
        assert row == [(use["prompt_tokens"], use["completion_tokens"])]
    for rid in cancelled:
        ((status, completion),) = ledger(
            s.home, "SELECT status, completion_tokens FROM usage WHERE request_id = ?", rid
        )
        assert status == "cancelled" and 0 < completion < 400, (status, completion)
    # Generation for the cancelled streams stopped: nothing left running.
    deadline = time.monotonic() + 10
    while s.metric("num_requests_running") > 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)

    ((prompt, completion, cost, rows),) = ledger(
        s.home,
        "SELECT sum(prompt_tokens), sum(completion_tokens), sum(cost_nusd), count(*) FROM usage",
    )
    assert cost > 0
    assert s.metric("prompt_tokens_total") == prompt
    assert s.metric("generation_tokens_total") == completion
    assert s.metric("cost_nanousd_total") == cost
    assert s.metric("requests_total") == rows
    statuses = dict(ledger(s.home, "SELECT status, count(*) FROM usage GROUP BY status"))
    assert statuses["cancelled"] == 4 and statuses["rate_limited"] == 1

    pgtest.use_home(monkeypatch, s.home)
    period = datetime.now(UTC).strftime("%Y-%m")
    assert main(["bill", "--period", period, "--out", str(tmp_path)]) == 0
    invoice = json.loads((tmp_path / f"LMF-{period}.json").read_text())
    assert invoice["total_nanousd"] == cost
    assert sum(line["amount_nanousd"] for line in invoice["lines"]) == cost
    from decimal import ROUND_HALF_UP, Decimal

    cents = (Decimal(cost) / 10**9).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    assert invoice["total"] == f"{cents}"
    assert f"${cents}" in (tmp_path / f"LMF-{period}.md").read_text()
    assert f"${cents}" in (tmp_path / f"LMF-{period}.html").read_text()
    by_key = {line["key"] for line in invoice["lines"]}
    assert {"mixed", "mixed-limited"} <= by_key


def test_request_lineage_starts_at_the_x_request_id(
    metered: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    r = httpx.post(
        f"{metered.url}/v1/completions",
        json={"model": metered.model, "prompt": "hi", "max_tokens": 2},
        headers=metered.headers,
    )
    rid = r.headers["x-request-id"]
    pgtest.use_home(monkeypatch, metered.home)
    capsys.readouterr()
    assert main(["lineage", rid, "--json"]) == 0
    tree = json.loads(capsys.readouterr().out)
    text = json.dumps(tree)
    assert rid in text and metered.model in text


def test_moderation_blocks_input_and_withholds_output(
    metered: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = metered
    key = create_key(s.home, "moderated")
    pgtest.use_home(monkeypatch, s.home)

    def set_policy(input: str, output: str) -> None:
        argv = ["moderation", "policy", "set", "--key", "moderated"]
        assert main([*argv, "--input", input, "--output", output]) == 0

    assert main(["moderation", "rules", "add", "--category", "violence", "--word", "kaboom"]) == 0
    set_policy("block", "off")
    with httpx.Client(base_url=s.url, headers=bearer(key), timeout=60) as c:
        r = c.post(
            "/v1/chat/completions",
            json={"model": s.model, "messages": [{"role": "user", "content": "say KABOOM now"}]},
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "content_policy_violation"
        assert "violence" in r.json()["error"]["message"]
        rid = r.headers["x-request-id"]
        ok = c.post("/v1/completions", json={"model": s.model, "prompt": "calm", "max_tokens": 2})
        assert ok.status_code == 200
        assert ledger(s.home, "SELECT status, cost_nusd FROM usage WHERE request_id = ?", rid) == [
            ("blocked", 0)
        ]
        audit = ledger(
            s.home, "SELECT action, actor, details FROM audit_log WHERE action = 'moderation.block'"
        )
        assert any(rid in details and actor == "key:moderated" for _, actor, details in audit)

        # Output: a rule any generated letter trips; under "block" the text is withheld.
        assert (
            main(["moderation", "rules", "add", "--category", "test/any", "--regex", "[a-z]"]) == 0
        )
        set_policy("off", "block")
        # Greedy, so the plain and the streamed request generate the same text: with sampling
        # the stream could draw 8 tokens without a letter and rightly end with "length".
        body = {
            "model": s.model,
            "prompt": [5, 6],
            "max_tokens": 8,
            "ignore_eos": True,
            "temperature": 0,
        }
        plain = c.post("/v1/completions", json=body).json()["choices"][0]
        assert plain["finish_reason"] == "content_filter" and plain["text"] == ""
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "content_filter"
        set_policy("off", "off")
        again = c.post("/v1/completions", json=body).json()["choices"][0]
        assert again["finish_reason"] == "length" and again["text"]


def _kill_trials(home: Path, model_dir: Path, trials: int, seed: int) -> list[str]:
    """TRIALS times: start a server on HOME, load it from 2 clients, SIGKILL it at a random
    moment, check the database; return the ids of the requests the clients saw succeed."""
    key = create_key(home, "killed", rpm=100_000, tpm=10_000_000, budget="1000")
    succeeded: list[str] = []
    rng = random.Random(seed)
    for trial in range(trials):
        server = start_server(model_dir, home, "--max-batch", "4", key=key)
        stop = threading.Event()

        def loop(server: Server = server, stop: threading.Event = stop) -> None:
            with httpx.Client(base_url=server.url, headers=bearer(key), timeout=30) as c:
                i = 0
                while not stop.is_set():
                    body = {"model": server.model, "prompt": f"t{i}", "max_tokens": 1 + i % 5}
                    try:
                        if i % 3 == 2:
                            with c.stream(
                                "POST", "/v1/completions", json={**body, "stream": True}
                            ) as r:
                                done = any(line == "data: [DONE]" for line in r.iter_lines())
                                if r.status_code == 200 and done:
                                    succeeded.append(r.headers["x-request-id"])
                        else:
                            r = c.post("/v1/completions", json=body)
                            if r.status_code == 200:
                                succeeded.append(r.headers["x-request-id"])
                    except httpx.HTTPError:
                        return  # the server died under us
                    i += 1

        clients = [threading.Thread(target=loop) for _ in range(2)]
        for t in clients:
            t.start()
        time.sleep(rng.uniform(0.05, 0.6))
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        stop.set()
        for t in clients:
            t.join()
        if pgtest.server_url() is None:  # SQLite's own check of its file
            with sqlite3.connect(home / "registry.db") as conn:
                assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)], trial
    return succeeded


def test_sigkill_during_requests_loses_no_succeeded_request(
    tmp_path: Path,
    tiny_tokenizer,  # type: ignore[no-untyped-def]
) -> None:
    model_dir = make_model_dir(tmp_path, tiny_tokenizer)
    # Two registries, each killed KILL_TRIALS / 2 times, side by side (server start-up is
    # mostly single-threaded imports, so two sequences take the time of one).
    homes = [tmp_path / "home-a", tmp_path / "home-b"]
    results: dict[Path, list[str]] = {}
    errors: list[BaseException] = []

    def run(home: Path, seed: int) -> None:
        try:
            results[home] = _kill_trials(home, model_dir, (KILL_TRIALS + 1) // 2, seed)
        except BaseException as e:  # re-raised below, in the test's thread
            errors.append(e)

    runners = [threading.Thread(target=run, args=(home, i)) for i, home in enumerate(homes)]
    for t in runners:
        t.start()
    for t in runners:
        t.join()
    if errors:
        raise errors[0]
    for home in homes:
        succeeded = results[home]
        assert len(succeeded) > KILL_TRIALS // 2  # the loops did run
        rows = dict(
            pgtest.query(
                home,
                "SELECT request_id, count(*) FROM usage WHERE status = 'ok' GROUP BY request_id",
            )
        )
        missing = [rid for rid in succeeded if rows.get(rid) != 1]
        assert not missing, (
            f"{len(missing)} of {len(succeeded)} succeeded requests not in the ledger"
        )
