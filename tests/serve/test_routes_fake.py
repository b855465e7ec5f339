"""The OpenAI routes against a fake engine (`fake_engine.FakeEngine`), in process, in milliseconds.

The app is the real one (`create_app`, its lifespan, dependencies, middleware, error handlers,
metering into a real SQLite registry); only the engine is fake, given through the state's
model loader as `lmforge serve` would load a model. The same routes run against the real
engine in the other files of this folder (a real `lmforge serve` process on loopback).
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fake_engine import FakeEngine
from fastapi.testclient import TestClient

from lmforge.infer.params import SamplingParams
from lmforge.registry.ledger import UsageRecord, get_usage
from lmforge.registry.moderation import add_rule, set_policy
from lmforge.serve.app import create_app
from lmforge.serve.choices import Generation, generate
from lmforge.serve.context import Caller
from lmforge.serve.errors import ClientDisconnected
from lmforge.serve.metering import admit
from lmforge.serve.moderation import ModerationService
from lmforge.serve.state import ServedModel, ServerSettings, ServerState

NAME = "fake"
PROMPT = [5, 6, 7]


@dataclass
class Served:
    client: TestClient
    state: ServerState
    engine: FakeEngine
    tokenizer: Any

    def ledger(self, response: Any) -> UsageRecord:
        with self.state.registry.connect() as conn:
            row = get_usage(conn, request_id=response.headers["x-request-id"])
        assert row is not None
        return row

    def text(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=False))


@pytest.fixture
def served(tmp_path: Path, tiny_tokenizer: Any) -> Iterator[Served]:
    engine = FakeEngine(vocab_size=tiny_tokenizer.vocab_size, max_model_len=64, max_queue=8)

    def loader(spec: str | None, settings: ServerSettings) -> ServedModel:
        assert spec == NAME
        return ServedModel(
            name=NAME,
            tokenizer=tiny_tokenizer,
            engine=engine,
            stop_token_ids=[tiny_tokenizer.eos_id],
            created=0,
            path=tmp_path,
            version=f"{NAME}@test",
        )

    settings = ServerSettings(models=[NAME], auth=False, home=tmp_path / "home")
    state = ServerState(settings, loader=loader)
    with TestClient(create_app(settings, state=state)) as client:
        assert state.loaded.wait(10) and state.ready, state.load_error
        yield Served(client, state, engine, tiny_tokenizer)
    assert engine.shut_down  # the lifespan shut it down


def completion(**body: Any) -> dict[str, Any]:
    return {"model": NAME, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, **body}


def chat(**body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "hello there"}]
    return {"model": NAME, "messages": messages, "max_tokens": 4, **body}


def events(response: Any) -> list[str]:
    assert response.status_code == 200, response.text
    return [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]


def assert_error(response: Any, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


# -- completions -------------------------------------------------------------------------------


def test_completion_is_the_engines_tokens_as_text(served: Served) -> None:
    r = served.client.post("/v1/completions", json=completion())
    assert r.status_code == 200, r.text
    body = r.json()
    ids = served.engine.expected(PROMPT, 5)
    assert body["choices"][0]["text"] == served.text(ids)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 5,
        "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    row = served.ledger(r)
    assert (row.status, row.http_status, row.prompt_tokens, row.completion_tokens) == (
        "ok",
        200,
        3,
        5,
    )
    assert row.model_version == f"{NAME}@test"


def test_a_stop_token_ends_the_choice_and_is_not_shown(served: Served) -> None:
    ids = served.engine.expected(PROMPT, 5)
    r = served.client.post("/v1/completions", json=completion(stop_token_ids=[ids[2]]))
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == served.text(ids[:2])
    assert r.json()["usage"]["completion_tokens"] == 3  # generated, so billed


def test_logprobs_have_one_entry_per_token_with_the_top_alternatives(served: Served) -> None:
    r = served.client.post("/v1/completions", json=completion(logprobs=2))
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert all(isinstance(v, float) and v < 0 for v in lp["token_logprobs"])
    assert all(1 <= len(top) <= 2 for top in lp["top_logprobs"])
    assert lp["text_offset"][0] == 0


def test_echo_with_max_tokens_0_scores_the_prompt(served: Served) -> None:
    r = served.client.post("/v1/completions", json=completion(max_tokens=0, echo=True, logprobs=1))
    choice = r.json()["choices"][0]
    assert choice["text"] == served.text(PROMPT)
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert len(choice["logprobs"]["token_logprobs"]) == len(PROMPT)
    assert r.json()["usage"]["completion_tokens"] == 0


def test_n_choices_are_separate_engine_requests_with_their_own_seeds(served: Served) -> None:
    r = served.client.post("/v1/completions", json=completion(n=2, seed=11, temperature=1))
    texts = [c["text"] for c in r.json()["choices"]]
    assert texts == [served.text(served.engine.expected(PROMPT, 5, s)) for s in (11, 12)]
    assert [s.params.seed for s in served.engine.started] == [11, 12]
    assert len({s.request_id for s in served.engine.started}) == 2


def test_a_streamed_completion_has_the_same_text_then_usage_then_done(served: Served) -> None:
    plain = served.client.post("/v1/completions", json=completion()).json()
    body = completion(stream=True, stream_options={"include_usage": True})
    got = events(served.client.post("/v1/completions", json=body))
    assert got[-1] == "[DONE]"
    chunks = [json.loads(e) for e in got[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == plain["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


# -- chat --------------------------------------------------------------------------------------


def test_chat_answers_with_the_engines_tokens(served: Served) -> None:
    r = served.client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200, r.text
    body = r.json()
    (prompt,) = {tuple(s.prompt_ids) for s in served.engine.started}
    answer = served.text(served.engine.expected(prompt, 4))
    assert body["choices"][0]["message"] == {"role": "assistant", "content": answer}
    assert body["object"] == "chat.completion" and body["usage"]["prompt_tokens"] == len(prompt)


def test_streamed_chat_starts_with_the_role_and_ends_with_done(served: Served) -> None:
    plain = served.client.post("/v1/chat/completions", json=chat()).json()
    got = events(served.client.post("/v1/chat/completions", json=chat(stream=True, logprobs=True)))
    assert got[-1] == "[DONE]"
    chunks = [json.loads(e) for e in got[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["logprobs"]["content"] for c in chunks[1:])


# -- embeddings, models, tokenizer routes ------------------------------------------------------


def test_embeddings_are_the_engines_vectors_in_both_encodings(served: Served) -> None:
    body = {"model": NAME, "input": [[5, 6], [7]]}
    r = served.client.post("/v1/embeddings", json=body)
    assert r.status_code == 200, r.text
    expected = asyncio.run(served.engine.embed([[5, 6], [7]]))
    assert [d["embedding"] for d in r.json()["data"]] == expected  # JSON keeps every digit
    assert r.json()["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert served.ledger(r).prompt_tokens == 3
    packed = served.client.post("/v1/embeddings", json={**body, "encoding_format": "base64"})
    raw = base64.b64decode(packed.json()["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(expected[0])


def test_models_lists_the_fake_with_the_engines_context(served: Served) -> None:
    listed = served.client.get("/v1/models").json()["data"]
    assert [(m["id"], m["max_model_len"]) for m in listed] == [(NAME, 64)]
    assert served.client.get(f"/v1/models/{NAME}").json()["id"] == NAME
    assert_error(served.client.get("/v1/models/nope"), 404, "model")


def test_tokenize_and_detokenize_round_trip(served: Served) -> None:
    r = served.client.post("/tokenize", json={"prompt": "The quick brown fox"})
    tokens = r.json()["tokens"]
    assert r.json()["max_model_len"] == 64 and r.json()["count"] == len(tokens)
    back = served.client.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert back == "The quick brown fox"
    vocab = served.engine.info.vocab_size
    assert_error(served.client.post("/detokenize", json={"tokens": [vocab]}), 400, "tokens")


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/completions", completion(max_tokens=100), "max_tokens"),
        ("/v1/completions", completion(prompt=[384]), "prompt"),
        ("/v1/completions", completion(prompt=list(range(3, 70))), "prompt"),
        ("/v1/completions", completion(prompt=[]), "prompt"),
        ("/v1/completions", completion(n=9), "n"),
        ("/v1/completions", completion(temperature=3), "temperature"),
        ("/v1/completions", completion(max_tokens=-1), "max_tokens"),
        ("/v1/completions", completion(stop=["x"] * 17), "stop"),
        ("/v1/chat/completions", chat(messages=[]), "messages"),
        ("/v1/chat/completions", chat(max_tokens=0), "max_tokens"),
        ("/v1/completions", completion(logit_bias={"384": 5}), "logit_bias"),
        ("/v1/completions", completion(logit_bias={"x": 5}), "logit_bias"),
        ("/v1/completions", completion(logit_bias={"-3": 5}), "logit_bias"),
        ("/v1/chat/completions", chat(logit_bias={"5": 100.5}), "logit_bias"),
        ("/v1/chat/completions", chat(logit_bias={"5": -101}), "logit_bias"),
        ("/v1/chat/completions", chat(logit_bias={"5": "big"}), "logit_bias"),
        (
            "/v1/chat/completions",
            chat(messages=[{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]),
            "messages",
        ),
        ("/v1/embeddings", {"model": NAME, "input": [[999]]}, "input"),
    ],
)
def test_bad_parameters_are_400s_naming_them_before_the_engine(
    served: Served, route: str, body: dict[str, Any], param: str
) -> None:
    assert_error(served.client.post(route, json=body), 400, param)
    assert served.engine.started == []  # the route checked: nothing reached the engine


def test_a_full_queue_is_a_503_to_retry(served: Served) -> None:
    served.engine.queue_full = True
    for body in (completion(), completion(stream=True)):
        r = served.client.post("/v1/completions", json=body)
        error = assert_error(r, 503)
        assert error["type"] == "service_unavailable" and r.headers["retry-after"] == "1"
        row = served.ledger(r)
        assert (row.status, row.http_status, row.completion_tokens) == ("error", 503, 0)


def test_a_request_the_engine_fails_is_a_500_in_openai_shape(served: Served) -> None:
    served.engine.fail_next(after_tokens=2, message="logits were NaN")
    r = served.client.post("/v1/completions", json=completion(n=2))
    error = assert_error(r, 500)
    assert error == {
        "message": "logits were NaN",
        "type": "server_error",
        "param": None,
        "code": "request_failed",
    }
    row = served.ledger(r)
    assert (row.status, row.http_status, row.cost_nusd) == ("error", 500, 0)
    other = served.engine.started[1]
    assert other.request_id in served.engine.aborted  # its sibling was stopped, not left running
    assert served.engine.num_requests == 0
    assert served.client.post("/v1/completions", json=completion()).status_code == 200
    metrics = served.client.get("/metrics").text
    assert 'lmforge:request_failures_total{model_name="fake"} 1.0' in metrics


def test_a_stream_the_engine_fails_ends_with_an_error_event_then_done(served: Served) -> None:
    served.engine.fail_next(after_tokens=3, message="sampling failed")
    r = served.client.post("/v1/completions", json=completion(stream=True))
    got = events(r)
    assert got[-1] == "[DONE]"
    error = json.loads(got[-2])["error"]
    assert (error["type"], error["code"], error["message"]) == (
        "server_error",
        "request_failed",
        "sampling failed",
    )
    pieces = [json.loads(e)["choices"][0]["text"] for e in got[:-2]]
    assert pieces and served.text(served.engine.expected(PROMPT, 3)).startswith("".join(pieces))
    row = served.ledger(r)
    assert (row.status, row.http_status, row.cost_nusd) == ("error", 500, 0)


def test_a_failure_before_the_first_token_of_a_stream_is_a_plain_500(served: Served) -> None:
    served.engine.fail_next(after_tokens=0)
    r = served.client.post("/v1/chat/completions", json=chat(stream=True))
    assert assert_error(r, 500)["code"] == "request_failed"
    assert served.ledger(r).status == "error"


def test_metrics_come_from_the_engines_snapshot(served: Served) -> None:
    served.client.post("/v1/completions", json=completion())
    text = served.client.get("/metrics").text
    for name in (
        "lmforge:engine_generation_tokens_total",
        "lmforge:engine_prompt_tokens_total",
        "lmforge:prefix_cache_queries_total",
        "lmforge:prefix_cache_hits_total",
        "lmforge:request_failures_total",
        "lmforge:kv_cache_usage_perc",
        "lmforge:num_requests_running",
    ):
        assert f'{name}{{model_name="fake"}}' in text, name
    assert 'lmforge:engine_generation_tokens_total{model_name="fake"} 5.0' in text
    assert 'lmforge:kv_cache_usage_perc{model_name="fake"} 0.0' in text


# -- content policy ----------------------------------------------------------------------------


def test_the_content_policy_blocks_input_and_withholds_a_stream(served: Served) -> None:
    with served.state.registry.begin() as conn:
        add_rule(conn, category="test/any", kind="regex", pattern="[a-z]", actor="test")
        set_policy(conn, scope="default", input="block", output="off", actor="test")
    blocked = served.client.post("/v1/chat/completions", json=chat())
    assert assert_error(blocked, 400, "messages")["code"] == "content_policy_violation"
    assert (served.ledger(blocked).status, served.engine.started) == ("blocked", [])

    with served.state.registry.begin() as conn:
        set_policy(conn, scope="default", input="off", output="block", actor="test")
    streamed = served.client.post("/v1/completions", json=completion(stream=True, max_tokens=20))
    got = events(streamed)
    assert got[-1] == "[DONE]"
    assert json.loads(got[-2])["choices"][0]["finish_reason"] == "content_filter"
    row = served.ledger(streamed)
    assert row.status == "ok" and 1 <= row.completion_tokens < 20  # billed what was made
    assert served.engine.num_requests == 0


# -- below the routes: no HTTP request ---------------------------------------------------------


def test_a_caller_gone_mid_generation_aborts_it_and_bills_what_was_made(served: Served) -> None:
    state = served.state
    model = state.models[NAME]
    calls = 0

    async def gone_after_two() -> bool:
        nonlocal calls
        calls += 1
        return calls > 2

    async def run() -> None:
        caller = Caller(request_id="req-gone", key=None, response_headers={},
                        is_disconnected=gone_after_two)  # fmt: skip
        params = SamplingParams(max_tokens=30)
        meter = await admit(state, caller, model, "/v1/completions", 3, 30)
        gen = Generation(
            served=model,
            prompts=[PROMPT],
            params=params,
            caller=caller,
            meter=meter,
            moderation=ModerationService(state.registry),
            prompt_param="prompt",
        )
        with pytest.raises(ClientDisconnected):
            await generate(gen)

    asyncio.run(run())
    with state.registry.connect() as conn:
        row = get_usage(conn, request_id="req-gone")
    assert row is not None
    assert (row.status, row.http_status, row.completion_tokens) == ("cancelled", 499, 2)
    assert served.engine.aborted == [served.engine.started[0].request_id]


# -- prefix caching and logit_bias as the routes pass them -------------------------------------


def test_usage_reports_the_prompt_tokens_found_in_the_prefix_cache(served: Served) -> None:
    system = list(range(3, 43))  # 40 tokens: two whole blocks of 16
    first = served.client.post("/v1/completions", json=completion(prompt=[*system, 50]))
    assert first.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    again = served.client.post("/v1/completions", json=completion(prompt=[*system, 60, 61]))
    assert again.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
    body = completion(prompt=[*system, 70], stream=True, stream_options={"include_usage": True})
    chunks = [json.loads(e) for e in events(served.client.post("/v1/completions", json=body))[:-1]]
    assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}


def test_logit_bias_reaches_the_engine_as_token_ids(served: Served) -> None:
    r = served.client.post("/v1/chat/completions", json=chat(logit_bias={"7": -100, "9": 2.5}))
    assert r.status_code == 200, r.text
    assert served.engine.started[0].params.logit_bias == {7: -100.0, 9: 2.5}
