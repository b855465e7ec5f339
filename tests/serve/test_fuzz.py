"""Schemathesis against a real `lmforge serve`: every operation of its OpenAPI schema with
valid and invalid inputs. No 5xx, every error in OpenAI's shape, /health answers after every
case, and the server's memory stays within 50 MB of its warm baseline.

`LMFORGE_FUZZ_CASES` sets the number of cases (CI: 200; `make reliability`: 1,200)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from served import Server, tiny_server

CASES = int(os.environ.get("LMFORGE_FUZZ_CASES", "200"))
RSS_SLACK = 50 * 2**20


@pytest.fixture(scope="module")
def server(tiny_server: Server) -> Server:
    """This module's own server (`served.tiny_server` is module-scoped)."""
    return tiny_server


def rss(server: Server) -> int:
    return int(psutil.Process(server.process.pid).memory_info().rss)


def openai_error_shape(body: Any) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and isinstance(error.get("message"), str) and "type" in error


@pytest.mark.slow
def test_every_operation_survives_fuzzing(server: Server) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    per_mode = max(3, -(-CASES // len(operations)))  # ceil: small spaces give fewer cases
    client = httpx.Client(base_url=server.url, timeout=60)
    for _ in range(3):  # warm: the first requests allocate the engine's buffers
        client.post("/v1/completions", headers=server.headers,
                    json={"model": server.model, "prompt": "warm", "max_tokens": 16})  # fmt: skip
    baseline = rss(server)
    seen: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    problems: list[str] = []

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=per_mode, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))  # fmt: skip
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                headers = {**server.headers, **(case.headers or {})}
                response = case.call(headers=headers, timeout=60)
                label = case.operation.label
                seen[label] += 1
                statuses[response.status_code] += 1
                what = f"{label} → {response.status_code}"
                if response.status_code >= 500:
                    problems.append(f"{what}: {response.text[:300]}")
                elif response.status_code >= 400:
                    try:
                        body = response.json()
                    except ValueError:
                        body = None
                    if not openai_error_shape(body):
                        problems.append(f"{what}: not OpenAI's error shape: {response.text[:300]}")
                if client.get("/health").status_code != 200:
                    problems.append(f"{what}: /health failed after it")

            try:
                run()
            except Unsatisfiable:  # no invalid input exists (e.g. GET /health takes none)
                assert mode is GenerationMode.NEGATIVE, operation.label
    total = sum(seen.values())
    grown = rss(server) - baseline
    print(f"{total} cases over {len(operations)} operations; RSS {grown / 2**20:+.1f} MB; "
          f"statuses {dict(sorted(statuses.items()))}")  # fmt: skip
    assert not problems, "\n".join(problems[:30])
    assert total >= CASES
    ok = sum(n for code, n in statuses.items() if code < 300)
    assert ok >= total // 10, statuses  # the cases reach the handlers, not only validation
    assert grown <= RSS_SLACK, f"the server grew {grown / 2**20:.1f} MB"
