"""Two `lmforge serve` replicas on one PostgreSQL registry enforce one key's limits exactly.

Runs under `make test-pg` (it needs the shared PostgreSQL; on SQLite the same guarantees are
tested across uvicorn workers in `test_keys_limits`). Both servers share one $LMFORGE_HOME and so
one schema; requests are spread over both at once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from served import Server, burst, create_key, make_model_dir, start_server, stop_server

import pgtest
from conftest import lmforge
from lmforge.ops.pricing import cost_nusd

pytestmark = pytest.mark.skipif(
    pgtest.server_url() is None, reason="needs PostgreSQL: make test-pg"
)

PROMPT = [5, 6, 7, 8]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Iterator[list[Server]]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("replicas")
    model_dir = make_model_dir(root, tiny_tokenizer)
    home = root / "home"
    servers: list[Server] = []
    starters = [
        threading.Thread(
            target=lambda: servers.append(start_server(model_dir, home, "--max-batch", "8"))
        )
        for _ in range(2)
    ]
    for t in starters:
        t.start()
    for t in starters:
        t.join()
    assert len(servers) == 2, "a replica did not start"
    yield servers
    for server in servers:
        stop_server(server)


def _body(server: Server) -> dict[str, Any]:
    return {
        "model": server.model,
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,  # every admitted request uses exactly what it reserved
        "temperature": 0,
    }


def _requests_total(server: Server) -> float:
    """Requests SERVER has metered (the counter appears with its first request)."""
    try:
        return server.metric("requests_total")
    except AssertionError:
        return 0.0


def _key_rows(home: Path, name: str) -> list[tuple[Any, ...]]:
    return pgtest.query(
        home,
        "SELECT status, count(*) FROM usage WHERE key_id = "
        "(SELECT id FROM api_keys WHERE name = ?) GROUP BY status ORDER BY status",
        name,
    )


def test_rpm_10_over_two_replicas_admits_exactly_10_of_100(replicas: list[Server]) -> None:
    home = replicas[0].home
    key = create_key(home, "rpm-ten", rpm=10)
    before = [_requests_total(s) for s in replicas]
    codes = burst(replicas, key, 100, _body(replicas[0]))
    assert (codes.count(200), codes.count(429)) == (10, 90), codes
    assert _key_rows(home, "rpm-ten") == [("ok", 10), ("rate_limited", 90)]
    # each replica metered its half into the one ledger; a counter is bumped just after its
    # ledger row commits, so the last ones may trail the responses by a moment
    deadline = time.monotonic() + 10
    while True:
        served = [_requests_total(s) - b for s, b in zip(replicas, before, strict=True)]
        if served == [50, 50] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert served == [50, 50]


def test_tpm_over_two_replicas_admits_exactly_what_fits(replicas: list[Server]) -> None:
    home = replicas[0].home
    per_request = len(PROMPT) + MAX_TOKENS
    key = create_key(home, "tpm-five", tpm=5 * per_request)
    codes = burst(replicas, key, 40, _body(replicas[0]))
    assert (codes.count(200), codes.count(429)) == (5, 35), codes
    ((tokens,),) = pgtest.query(
        home,
        "SELECT sum(prompt_tokens + completion_tokens) FROM usage WHERE status = 'ok' AND "
        "key_id = (SELECT id FROM api_keys WHERE name = 'tpm-five')",
    )
    assert tokens == 5 * per_request


def test_budget_over_two_replicas_is_spent_exactly_and_not_beyond(
    replicas: list[Server],
) -> None:
    home = replicas[0].home
    admin = httpx.Client(base_url=replicas[0].url, headers=replicas[0].headers, timeout=60)
    assert admin.put(
        f"/v1/admin/prices/{replicas[0].model}", json={"input": "100", "output": "300"}
    ).is_success
    one = cost_nusd(len(PROMPT), MAX_TOKENS, 100 * 10**6, 300 * 10**6)
    key = create_key(home, "three-requests", budget=f"{3 * one / 10**9:.9f}")
    codes = burst(replicas, key, 40, _body(replicas[0]))
    assert (codes.count(200), codes.count(429)) == (3, 37), codes
    ((spent, reserved, budget),) = pgtest.query(
        home,
        "SELECT spent_nusd, reserved_nusd, budget_nusd FROM api_keys WHERE name = ?",
        "three-requests",
    )
    assert (spent, reserved) == (3 * one, 0) and spent <= budget
    assert pgtest.query(home, "SELECT count(*) FROM reservations") == [(0,)]
    for server in replicas:  # spent is spent on every replica
        r = httpx.post(
            f"{server.url}/v1/completions",
            json=_body(server),
            headers={"Authorization": f"Bearer {key}"},
        )
        assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
    admin.close()


def test_lmforge_usage_sees_one_ledger(replicas: list[Server]) -> None:
    home = replicas[0].home
    key = create_key(home, "both-replicas")
    for server in replicas:
        headers = {"Authorization": f"Bearer {key}"}
        for _ in range(3):
            r = httpx.post(f"{server.url}/v1/completions", json=_body(server), headers=headers)
            assert r.status_code == 200, r.text
    proc = lmforge("usage", "report", "--key", "both-replicas", "--format", "json", home=home)
    assert proc.returncode == 0, proc.stderr
    (total,) = json.loads(proc.stdout)
    assert total["requests"] == 6 and total["ok"] == 6
    assert total["completion_tokens"] == 6 * MAX_TOKENS
    everything = lmforge("usage", "report", "--group-by", "key", "--format", "json", home=home)
    groups = {row["key"]: row["requests"] for row in json.loads(everything.stdout)}
    in_db = pgtest.query(
        home,
        "SELECT coalesce(k.name, '(no key)'), count(*) FROM usage u "
        "LEFT JOIN api_keys k ON k.id = u.key_id GROUP BY 1",
    )
    assert groups == dict(in_db) and groups["both-replicas"] == 6
