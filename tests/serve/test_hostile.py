"""A hostile corpus against a real `lmforge serve`: over 200 hand-written bad requests — wrong
types, out-of-range and non-finite numbers, huge bodies and headers, invalid UTF-8 and JSON,
path traversal in model names and routes, SQL and control characters in headers and keys. Every
one gets a 4xx in OpenAI's error shape, the server keeps serving, and no secret or file outside
$LMFORGE_HOME comes back."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from served import Server, create_key, tiny_server

CMPL, CHAT, EMBED = "/v1/completions", "/v1/chat/completions", "/v1/embeddings"

# Values no field accepts where a number is wanted (hand-written; JSON text where JSON cannot
# say it, e.g. NaN, which Python's json writes and a strict parser refuses).
BAD_NUMBERS: list[Any] = [
    "1", "", [], {}, True, -1, 10**30, -(10**30), "NaN", "Infinity", "-Infinity", "0x10", [1],
    {"value": 1}, "１",  # a full-width digit
]  # fmt: skip
# Valid after all: -1 as a penalty, a seed or top_k's "off"; a huge top_k (all tokens).
ACCEPTED = {("presence_penalty", -1), ("frequency_penalty", -1), ("seed", -1), ("top_k", -1),
            ("top_k", 10**30)}  # fmt: skip
NUMBER_FIELDS = {
    CMPL: ["max_tokens", "temperature", "top_p", "top_k", "n", "seed", "presence_penalty",
           "frequency_penalty", "logprobs"],
    CHAT: ["max_tokens", "temperature", "top_p", "n", "seed", "max_completion_tokens"],
}  # fmt: skip
BAD_PROMPTS: list[Any] = [
    None, 5, 1.5, True, {}, {"text": "x"}, [None], [[-1]], [[10**9]], [[1.5]], [["a"]],
    [[]], [], [[1, "2"]], "x" * 2_000_000,
]  # fmt: skip
BAD_MESSAGES: list[Any] = [
    None, "hello", 5, {}, [], [None], [{}], [{"role": "user"}], [{"content": "hi"}],
    [{"role": "wizard", "content": "hi"}], [{"role": "user", "content": 5}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
    [{"role": "user", "content": [{"type": "text"}]}], [{"role": ["user"], "content": "hi"}],
    [[1, 2]],
]  # fmt: skip
BAD_MODELS: list[Any] = [
    "../../etc/passwd", "/etc/passwd", "..", "models/../../registry.db", "~/.ssh/id_rsa",
    "file:///etc/passwd", "x\x00y", "' OR 1=1 --", "tiny; rm -rf /", "%2e%2e%2fregistry.db",
    "", " ", "A" * 5000, 5, None, ["tiny"], {"name": "tiny"},
]  # fmt: skip
BAD_EMBED_INPUTS: list[Any] = [None, 5, {}, [None], [[-1]], [[1.5]], [{"a": 1}], [], [[]]]
BAD_STOPS: list[Any] = [5, [5], {}, [None], ["x"] * 100, [""] * 5, [["x"]]]
BAD_HEADERS: list[dict[str, str | bytes]] = [
    {"Authorization": "Bearer ' OR '1'='1"},
    {"Authorization": "Bearer lmf-'; DROP TABLE api_keys; --"},
    {"Authorization": "Basic dXNlcjpwYXNz"},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer " + "A" * 10_000},
    {"Authorization": b"Bearer lmf-\xe9\xe8"},  # latin-1 bytes in a key
    {"Authorization": ""},
    {"Authorization": "bearer lmf-nope"},
    {"X-Api-Key": "' OR 1=1"},
    {"Authorization": "Bearer ../../registry.db"},
]


def cases(model: str) -> Iterator[tuple[str, str, str, Any, dict[str, str]]]:
    """(id, method, path, JSON body or raw bytes, extra headers) of every hostile request."""
    base_c = {"model": model, "prompt": "hello", "max_tokens": 4}
    base_m = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for path, base in ((CMPL, base_c), (CHAT, base_m)):
        for field in NUMBER_FIELDS[path]:
            for i, value in enumerate(BAD_NUMBERS):
                if type(value) is int and (field, value) in ACCEPTED:
                    continue
                if isinstance(value, str) and value in ("NaN", "Infinity", "-Infinity"):
                    raw = json.dumps(base)[:-1] + f', "{field}": {value}}}'
                    yield f"{path}-{field}-{value}", "POST", path, raw.encode(), {}
                    continue
                yield f"{path}-{field}-{i}", "POST", path, {**base, field: value}, {}
        for i, model_name in enumerate(BAD_MODELS):
            yield f"{path}-model-{i}", "POST", path, {**base, "model": model_name}, {}
        for i, stop in enumerate(BAD_STOPS):
            yield f"{path}-stop-{i}", "POST", path, {**base, "stop": stop}, {}
        for i, headers in enumerate(BAD_HEADERS):
            yield f"{path}-header-{i}", "POST", path, base, {"X-No-Admin-Key": "1", **headers}
    for i, prompt in enumerate(BAD_PROMPTS):
        yield f"prompt-{i}", "POST", CMPL, {**base_c, "prompt": prompt}, {}
    for i, messages in enumerate(BAD_MESSAGES):
        yield f"messages-{i}", "POST", CHAT, {**base_m, "messages": messages}, {}
    for i, inputs in enumerate(BAD_EMBED_INPUTS):
        yield f"embed-{i}", "POST", EMBED, {"model": model, "input": inputs}, {}
    raw_bodies: list[bytes] = [
        b"", b"null", b"[]", b"42", b'"text"', b"{", b'{"model": }', b"\xff\xfe\xfa",
        b'{"model": "\xff\xfe", "prompt": "x"}', b'{"prompt": "\xed\xa0\x80"}',  # lone surrogate
        b"{" * 100_000, b'{"a":' * 5000 + b"1" + b"}" * 5000, b"\x00" * 64,
        json.dumps({"model": model, "prompt": "x" * 3_000_000}).encode(),  # over 2 MiB
    ]  # fmt: skip
    for path in (CMPL, CHAT, EMBED, "/tokenize"):
        for i, body in enumerate(raw_bodies):
            yield f"raw-{path}-{i}", "POST", path, body, {}
    for i, route in enumerate([
        "/v1/models/../../etc/passwd", "/v1/models/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/v1/models/..%2fregistry.db", "/v1/admin/keys/..%2f..%2fregistry.db",
        "/v1/admin/models/..%2f..%2fetc", "/v1/admin/runs/..%2f..%2fetc/metrics",
        "/v1/admin/invoices/..%2f2026-11", "/dashboard/static/..%2fapp.py",
        "/dashboard/static/%2e%2e/__init__.py", "/v1/../../etc/passwd",
    ]):  # fmt: skip
        yield f"route-{i}", "GET", route, None, {}
    yield "admin-as-user", "GET", "/v1/admin/keys", None, {"X-Use-User-Key": "1"}


@pytest.fixture(scope="module")
def server(tiny_server: Server) -> Server:
    """This module's own server (`served.tiny_server` is module-scoped)."""
    return tiny_server


def test_the_corpus_is_large_enough(server: Server) -> None:
    assert len(list(cases(server.model))) >= 200


def test_every_hostile_request_is_a_4xx_in_openai_shape(server: Server) -> None:
    user_key = create_key(server.home, "hostile-user")
    secret_markers = [server.key, user_key, "root:x:0:0", str(server.home)]
    problems: list[str] = []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for case_id, method, path, body, extra in cases(server.model):
            if "X-Use-User-Key" in extra:  # an admin route with a plain key
                headers = {"Authorization": f"Bearer {user_key}"}
            elif "X-No-Admin-Key" in extra:  # hostile credentials only
                headers = {k: v for k, v in extra.items() if k != "X-No-Admin-Key"}
            else:
                headers = {**server.headers, **extra}
            if isinstance(body, bytes):
                json_type = {**headers, "Content-Type": "application/json"}
                kwargs: dict[str, Any] = {"content": body, "headers": json_type}
            elif body is None:
                kwargs = {"headers": headers}
            else:
                kwargs = {"json": body, "headers": headers}
            try:
                r = client.request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                problems.append(f"{case_id}: {exc!r}")
                continue
            if not 400 <= r.status_code < 500:
                problems.append(f"{case_id}: {r.status_code} {r.text[:200]}")
                continue
            try:
                error = r.json()["error"]
                assert isinstance(error["message"], str) and "type" in error
            except (ValueError, KeyError, TypeError, AssertionError):
                problems.append(f"{case_id}: not OpenAI's error shape: {r.text[:200]}")
            leaked = [m for m in secret_markers if m and m in r.text]
            if leaked:
                problems.append(f"{case_id}: the response shows {leaked}")
        still = {"model": server.model, "prompt": "still here", "max_tokens": 4}
        ok = client.post(CMPL, headers=server.headers, json=still)
    assert not problems, "\n".join(problems[:40])
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
