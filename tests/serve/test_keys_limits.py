"""Keys, limits, budgets and the ledger against real `lmforge serve` processes and SQLite files.

The issue's must-shows: rpm=10 across 4 uvicorn workers → exactly 10 of 100; a budget race of
8 and 64 requests released together → at most what the budget covers, nothing left reserved;
no plaintext key in the database or the logs; a revoked key refused on the next request; SQL in
the Authorization header → 401 with the database unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from served import (
    Server,
    burst,
    create_key,
    make_model_dir,
    start_server,
    stop_server,
)

import pgtest
from lmforge.ops.pricing import cost_nusd

LIMIT_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
)


def completion(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "prompt": "hello", "max_tokens": 2, "temperature": 0, **extra}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def db_rows(home: Path, query: str) -> list[tuple[Any, ...]]:
    return pgtest.query(home, query)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Iterator[Server]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("keys")
    server = start_server(make_model_dir(root, tiny_tokenizer), root / "home", "--max-batch", "4")
    yield server
    stop_server(server)


# ---------------------------------------------------------------------------------------------
# Authentication: deny by default


def test_every_route_but_health_and_ready_needs_a_key(keyed: Server) -> None:
    with httpx.Client(base_url=keyed.url, timeout=30) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/ready").status_code == 200
        for method, path in (
            ("GET", "/v1/models"),
            ("POST", "/v1/completions"),
            ("POST", "/v1/chat/completions"),
            ("POST", "/v1/embeddings"),
            ("POST", "/v1/moderations"),
            ("POST", "/tokenize"),
            ("GET", "/metrics"),
            ("GET", "/v1/admin/keys"),
        ):
            r = c.request(method, path, json={})
            assert r.status_code == 401, (path, r.text)
            error = r.json()["error"]
            assert error["code"] == "invalid_api_key" and "API key" in error["message"]
            assert r.headers["x-request-id"].startswith("req-")
        wrong = c.get("/v1/models", headers=bearer("lmf-" + "x" * 43))
        assert wrong.status_code == 401 and wrong.json()["error"]["message"]


def test_a_revoked_key_is_refused_on_the_very_next_request(keyed: Server) -> None:
    key = create_key(keyed.home, "soon-revoked")
    body = completion(keyed.model)
    with httpx.Client(base_url=keyed.url, headers=bearer(key), timeout=30) as c:
        assert c.post("/v1/completions", json=body).status_code == 200
        r = httpx.delete(f"{keyed.url}/v1/admin/keys/soon-revoked", headers=keyed.headers)
        assert r.status_code == 200 and r.json()["status"] == "revoked"
        refused = c.post("/v1/completions", json=body)
        assert refused.status_code == 401 and "revoked" in refused.json()["error"]["message"]


def test_a_key_limited_to_other_models_sees_this_one_as_missing(keyed: Server) -> None:
    key = create_key(keyed.home, "other-models-only", models="someone-else")
    with httpx.Client(base_url=keyed.url, headers=bearer(key), timeout=30) as c:
        r = c.post("/v1/completions", json=completion(keyed.model))
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert c.get("/v1/models").json()["data"] == []
        assert c.get(f"/v1/models/{keyed.model}").status_code == 404


def test_admin_routes_need_an_admin_key_and_write_the_audit_log(keyed: Server) -> None:
    user = create_key(keyed.home, "plain-user")
    r = httpx.get(f"{keyed.url}/v1/admin/keys", headers=bearer(user))
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert httpx.get(f"{keyed.url}/metrics", headers=bearer(user)).status_code == 403

    admin = httpx.Client(base_url=keyed.url, headers=keyed.headers, timeout=30)
    made = admin.post("/v1/admin/keys", json={"name": "via-api", "rpm": 5, "budget": "1.5"})
    assert made.status_code == 201, made.text
    secret = made.json()["key"]
    assert secret.startswith("lmf-") and made.json()["budget"] == "$1.500000"
    assert httpx.get(f"{keyed.url}/v1/models", headers=bearer(secret)).status_code == 200
    listed = admin.get("/v1/admin/keys").json()["data"]
    assert secret not in str(listed) and any(k["name"] == "via-api" for k in listed)
    assert admin.patch("/v1/admin/keys/via-api", json={"rpm": None}).json()["rpm"] is None
    assert admin.put(f"/v1/admin/prices/{keyed.model}", json={"input": "0", "output": 0}).is_success
    assert admin.get("/v1/admin/keys/nope").status_code == 404
    assert admin.post("/v1/admin/keys", json={"name": "via-api"}).status_code == 400  # taken
    audit = admin.get("/v1/admin/audit", params={"target": "via-api"}).json()["data"]
    assert [e["action"] for e in audit] == ["key.create", "key.update"]
    assert all(e["actor"].startswith("key:admin-") for e in audit)
    admin.close()


# ---------------------------------------------------------------------------------------------
# Requests per minute across 4 uvicorn workers


def test_rpm_10_across_4_workers_admits_exactly_10_of_100(tmp_path: Path, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    server = start_server(make_model_dir(tmp_path, tiny_tokenizer), home, "--workers", "4")
    try:
        key = create_key(home, "ten-per-minute", rpm=10)

        async def burst() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=16)
            async with httpx.AsyncClient(
                base_url=server.url, headers=bearer(key), timeout=60, limits=limits
            ) as c:
                body = completion(server.model)
                return list(
                    await asyncio.gather(
                        *(c.post("/v1/completions", json=body) for _ in range(100))
                    )
                )

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert codes.count(200) == 10 and codes.count(429) == 90, codes
        for r in responses:
            for header in LIMIT_HEADERS:
                assert header in r.headers, (header, r.headers)
            assert r.headers["x-ratelimit-limit-requests"] == "10"
        for r in (r for r in responses if r.status_code == 429):
            assert int(r.headers["retry-after"]) >= 1
            assert r.headers["x-ratelimit-remaining-requests"] == "0"
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
        pids = db_rows(
            home,
            "SELECT count(*), sum(CASE WHEN status = 'ok' THEN 1 ELSE 0 END) FROM usage"
            " WHERE key_id = (SELECT id FROM api_keys WHERE name = 'ten-per-minute')",
        )
        assert pids == [(100, 10)]
    finally:
        stop_server(server)


# ---------------------------------------------------------------------------------------------
# Budgets under a race


def test_budget_race_admits_at_most_what_the_budget_covers(tmp_path: Path, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    server = start_server(make_model_dir(tmp_path, tiny_tokenizer), home, "--max-batch", "8")
    try:
        admin = httpx.Client(base_url=server.url, headers=server.headers, timeout=60)
        admin.put(f"/v1/admin/prices/{server.model}", json={"input": "100", "output": "300"})
        prompt = [5, 6, 7, 8]
        max_tokens = 20
        # The price in micro-USD per million tokens; a maximal request reserves this much:
        one = cost_nusd(len(prompt), max_tokens, 100 * 10**6, 300 * 10**6)
        body = {
            "model": server.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0,
        }
        for concurrency in (8, 64):
            name = f"budget-{concurrency}"
            budget = f"{3 * one / 10**9:.9f}"
            key = create_key(home, name, budget=budget)
            results = burst([server], key, concurrency, body)
            assert results.count(200) <= 3 and results.count(200) >= 1, results
            assert results.count(200) + results.count(429) == concurrency, results
            view = admin.get(f"/v1/admin/keys/{name}").json()
            assert view["reserved"] == "$0.000000"
            ((spent, reserved, budget_nusd),) = db_rows(
                home,
                "SELECT spent_nusd, reserved_nusd, budget_nusd FROM api_keys "
                f"WHERE name = '{name}'",
            )
            assert reserved == 0 and spent <= budget_nusd
            assert db_rows(home, "SELECT count(*) FROM reservations") == [(0,)]
            (ledger,) = db_rows(
                home,
                "SELECT sum(cost_nusd) FROM usage WHERE key_id = "
                f"(SELECT id FROM api_keys WHERE name = '{name}')",
            )
            assert ledger == (spent,)
            refused = httpx.post(f"{server.url}/v1/completions", json=body, headers=bearer(key))
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "insufficient_quota"
            assert refused.headers["x-should-retry"] == "false"
        admin.close()
    finally:
        stop_server(server)


# ---------------------------------------------------------------------------------------------
# Secrets never stored; hostile Authorization headers


SQL_PROBES = [
    "' OR '1'='1",
    "lmf-' OR 1=1 --",
    "'; DROP TABLE api_keys; --",
    '" OR ""="',
    "lmf-%' OR prefix LIKE '%",
    "1; UPDATE api_keys SET admin=1",
    "lmf-\\'; DELETE FROM usage; --",
    "' UNION SELECT key_hash FROM api_keys --",
]


def test_keys_are_never_stored_and_hostile_headers_change_nothing(
    tmp_path: Path,
    tiny_tokenizer,  # type: ignore[no-untyped-def]
) -> None:
    home = tmp_path / "home"
    server = start_server(make_model_dir(tmp_path, tiny_tokenizer), home, "--max-batch", "4")
    try:
        keys = [create_key(home, f"user-{i:03d}") for i in range(100)]

        async def load() -> list[int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
                codes = []
                for start in range(0, 1000, 50):
                    batch = [
                        c.post(
                            "/v1/embeddings",
                            json={"model": server.model, "input": "hi"},
                            headers=bearer(keys[i % 100]),
                        )
                        for i in range(start, start + 50)
                    ]
                    codes += [r.status_code for r in await asyncio.gather(*batch)]
                return codes

        codes = asyncio.run(load())
        assert codes.count(200) == 1000
        before = hashlib.sha256(
            repr(db_rows(home, "SELECT * FROM api_keys ORDER BY id")).encode()
        ).hexdigest()
        usage_before = db_rows(home, "SELECT count(*) FROM usage")
        probes = [p + s for p in SQL_PROBES for s in ("", "x", " --", "%", "_")]
        probes = (probes * (500 // len(probes) + 1))[:500]
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for probe in probes:
                r = c.get("/v1/models", headers={"Authorization": f"Bearer {probe}"})
                assert r.status_code == 401, (probe, r.text)
        after = hashlib.sha256(
            repr(db_rows(home, "SELECT * FROM api_keys ORDER BY id")).encode()
        ).hexdigest()
        assert after == before and db_rows(home, "SELECT count(*) FROM usage") == usage_before
    finally:
        stop_server(server)
    log = server.log_path.read_text()
    assert "POST /v1/embeddings" in log  # the server did log the requests
    files = [p for p in home.rglob("*") if p.is_file()]
    assert pgtest.server_url() or any(p.name == "registry.db" for p in files)
    for key in keys:
        assert key not in log
        secret = key.encode()
        for path in files:
            assert secret not in path.read_bytes(), path
