"""/v1/classifications and /v1/answers on a real `lmforge serve` process serving a tiny
classifier, a tiny extractive QA model and a tiny language model side by side: the answers are
`infer.heads`' on the same weights, requests are keyed, limited and metered like the rest."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from served import Server, create_key, make_model_dir, start_server, stop_server

from conftest import tiny_config

LABELS = ("neg", "pos")
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "dull",
    "Pack my box with five dozen liquor jugs! How vexingly quick daft zebras jump",
    "café, naïve",
    "0123456789",
]
QUESTION = "What does the fox jump over?"
CONTEXT = (  # longer than one window of the QA model: several windows are read
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
    "How vexingly quick daft zebras jump; 0123456789. The dog sleeps in the sun all day long, "
    "and the fox runs back to the woods before the zebras wake."
)


@dataclass
class Served:
    server: Server
    clf: str  # the classifier's served name
    qa: str  # the QA model's
    lm: str  # the language model's
    clf_dir: Path
    qa_dir: Path


def _save_heads(root: Path, tokenizer: Any) -> tuple[Path, Path]:
    import torch

    from lmforge.model.formats import save_model
    from lmforge.model.heads import HeadConfig, SequenceClassifier, SpanQA
    from lmforge.model.transformer import Transformer

    torch.manual_seed(1)
    clf = SequenceClassifier(Transformer(tiny_config("llama")), HeadConfig("classify", LABELS))
    qa = SpanQA(Transformer(tiny_config("gpt2")), HeadConfig("qa", extra={"doc_stride": 8}))
    with torch.no_grad():  # random heads big enough that the texts get different labels
        clf.score.weight.normal_(0.0, 2.0)
        qa.qa_outputs.weight.normal_(0.0, 2.0)
    return (
        save_model(clf.eval(), tokenizer, root / "tiny-clf"),
        save_model(qa.eval(), tokenizer, root / "tiny-qa"),
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("tasks")
    clf_dir, qa_dir = _save_heads(root, tiny_tokenizer)
    lm_dir = make_model_dir(root, tiny_tokenizer)
    server = start_server(clf_dir, root / "home", str(qa_dir), str(lm_dir), "--max-batch", "2")
    yield Served(server, clf_dir.name, qa_dir.name, lm_dir.name, clf_dir, qa_dir)
    stop_server(server)


def post(s: Served, route: str, body: dict[str, Any], key: str | None = None) -> httpx.Response:
    headers = s.server.headers if key is None else {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{s.server.url}{route}", json=body, headers=headers, timeout=60)


def ledger_row(s: Served, request_id: str) -> tuple[Any, ...]:
    with sqlite3.connect(s.server.home / "registry.db") as conn:
        rows = conn.execute(
            "SELECT endpoint, model, prompt_tokens, completion_tokens, status, http_status "
            "FROM usage WHERE request_id = ?",
            (request_id,),
        ).fetchall()
    assert len(rows) == 1, rows
    return tuple(rows[0])


def billed_prompt_tokens(s: Served) -> float:
    """The Prometheus counter of billed prompt tokens (0 before the first metered request)."""
    try:
        return s.server.metric("prompt_tokens_total")
    except AssertionError:
        return 0.0


def assert_error(r: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    for word in words:
        assert word in error["message"], error
    assert r.headers["x-request-id"].startswith("req-")
    return dict(error)


# ---------------------------------------------------------------------------------------------


def test_classifications_match_in_process_and_keep_order(served: Served) -> None:
    from lmforge.infer.heads import classify
    from lmforge.model.formats import load_head_model

    model, tokenizer, _ = load_head_model(served.clf_dir)
    expected = classify(model, tokenizer, TEXTS)  # type: ignore[arg-type]
    assert len({p.label for p in expected}) == 2  # both labels occur: the order is visible

    prompt_before = billed_prompt_tokens(served)
    r = post(served, "/v1/classifications", {"model": served.clf, "input": TEXTS, "user": "u"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("clf-") and body["object"] == "list"
    assert body["model"] == served.clf
    assert [d["index"] for d in body["data"]] == list(range(len(TEXTS)))
    for got, want in zip(body["data"], expected, strict=True):
        assert got["object"] == "classification"
        assert got["label"] == want.label
        assert set(got["scores"]) == set(LABELS)
        for label in LABELS:
            assert got["scores"][label] == pytest.approx(want.scores[label], abs=1e-5)
    tokens = sum(p.tokens for p in expected)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}

    rid = r.headers["x-request-id"]
    assert ledger_row(served, rid) == ("/v1/classifications", served.clf, tokens, 0, "ok", 200)
    assert billed_prompt_tokens(served) == prompt_before + tokens

    # One text at a time: the same label and scores as in the batch (order kept).
    for i in (1, 2):
        r = post(served, "/v1/classifications", {"model": served.clf, "input": TEXTS[i]})
        assert r.status_code == 200, r.text
        (one,) = r.json()["data"]
        assert one["index"] == 0 and one["label"] == expected[i].label
        assert one["scores"]["pos"] == pytest.approx(expected[i].scores["pos"], abs=1e-5)


def test_answers_match_in_process(served: Served) -> None:
    from lmforge.infer.heads import answer
    from lmforge.model.formats import load_head_model

    model, tokenizer, _ = load_head_model(served.qa_dir)
    for max_answer_tokens in (30, 3):
        want = answer(
            model,  # type: ignore[arg-type]
            tokenizer,
            QUESTION,
            CONTEXT,
            max_answer_tokens=max_answer_tokens,
        )
        request = {"model": served.qa, "question": QUESTION, "context": CONTEXT}
        if max_answer_tokens != 30:
            request["max_answer_tokens"] = max_answer_tokens
        r = post(served, "/v1/answers", request)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"].startswith("ans-") and body["object"] == "answer"
        assert body["model"] == served.qa
        assert (body["answer"], body["start"], body["end"]) == (want.text, want.start, want.end)
        assert CONTEXT[body["start"] : body["end"]] == body["answer"]
        assert body["score"] == pytest.approx(want.score, abs=1e-4)
        assert body["usage"] == {"prompt_tokens": want.tokens, "total_tokens": want.tokens}
        assert want.tokens > model.config.max_seq_len  # several windows were read
        row = ledger_row(served, r.headers["x-request-id"])
        assert row == ("/v1/answers", served.qa, want.tokens, 0, "ok", 200)


def test_models_lists_heads_with_their_task(served: Served) -> None:
    r = httpx.get(f"{served.server.url}/v1/models", headers=served.server.headers)
    cards = {m["id"]: m for m in r.json()["data"]}
    assert sorted(cards) == sorted([served.clf, served.qa, served.lm])
    assert cards[served.clf]["task"] == "classify" and cards[served.qa]["task"] == "qa"
    assert "task" not in cards[served.lm]
    r = httpx.get(f"{served.server.url}/v1/models/{served.qa}", headers=served.server.headers)
    assert r.status_code == 200 and r.json()["task"] == "qa"


def test_bad_requests(served: Served) -> None:
    clf, qa = served.clf, served.qa
    for body in (
        {"model": clf, "input": ""},
        {"model": clf, "input": []},
        {"model": clf, "input": ["fine", ""]},
        {"model": clf, "input": ["x"] * 257},
        {"model": clf, "input": 3},
        {"model": clf},
    ):
        error = assert_error(post(served, "/v1/classifications", body), 400)
        assert error["param"] == "input", error
    for body, param in (
        ({"model": qa, "question": "", "context": CONTEXT}, "question"),
        ({"model": qa, "question": QUESTION, "context": ""}, "context"),
        ({"model": qa, "question": QUESTION, "context": CONTEXT, "max_answer_tokens": 0}, None),
        ({"model": qa, "question": QUESTION, "context": CONTEXT, "max_answer_tokens": 65}, None),
        ({"model": qa, "question": QUESTION, "context": CONTEXT, "max_answer_tokens": "3"}, None),
    ):
        error = assert_error(post(served, "/v1/answers", body), 400)
        assert error["param"] == (param or "max_answer_tokens"), error


def test_wrong_model_kind_names_the_right_route(served: Served) -> None:
    text = {"input": "fine"}
    qa_body = {"question": QUESTION, "context": CONTEXT}
    for route, body, words in (
        ("/v1/classifications", {"model": served.qa, **text}, ["QA", "/v1/answers"]),
        ("/v1/classifications", {"model": served.lm, **text}, ["language model", "completions"]),
        ("/v1/answers", {"model": served.clf, **qa_body}, ["classification", "classifications"]),
        ("/v1/completions", {"model": served.clf, "prompt": "hi"}, ["/v1/classifications"]),
        ("/v1/chat/completions", {"model": served.qa, "messages": []}, ["/v1/answers"]),
        ("/v1/embeddings", {"model": served.clf, "input": "hi"}, ["/v1/classifications"]),
    ):
        error = assert_error(post(served, route, body), 400, *words)
        assert error["param"] == "model", error
    # The language model still generates beside them.
    r = post(served, "/v1/completions", {"model": served.lm, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_keys_and_limits(served: Served) -> None:
    body = {"model": served.clf, "input": "fine"}
    r = httpx.post(f"{served.server.url}/v1/classifications", json=body, timeout=30)
    assert_error(r, 401)
    assert_error(post(served, "/v1/classifications", body, key="lmf-nonsense"), 401)
    assert_error(post(served, "/v1/classifications", {**body, "model": "nope"}), 404, "nope")

    qa_only = create_key(served.server.home, "qa-only", models=[served.qa])
    assert_error(post(served, "/v1/classifications", body, key=qa_only), 404)
    qa_body = {"model": served.qa, "question": QUESTION, "context": CONTEXT}
    assert post(served, "/v1/answers", qa_body, key=qa_only).status_code == 200

    limited = create_key(served.server.home, "one-a-minute", rpm=1)
    first = post(served, "/v1/classifications", body, key=limited)
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-limit-requests"] == "1"
    refused = post(served, "/v1/classifications", body, key=limited)
    assert_error(refused, 429)
    row = ledger_row(served, refused.headers["x-request-id"])
    assert row[0] == "/v1/classifications" and row[4] == "rate_limited"
