"""Task endpoints for fine-tuned heads: `POST /v1/classifications` and `POST /v1/answers`.

    curl localhost:8000/v1/classifications -H "Authorization: Bearer $KEY" \\
      -H 'content-type: application/json' -d '{"model": "sentiment", "input": ["fine", "dull"]}'
    curl localhost:8000/v1/answers -H "Authorization: Bearer $KEY" \\
      -H 'content-type: application/json' \\
      -d '{"model": "squad", "question": "Who wrote it?", "context": "It was written by Ann."}'

The model is a `ServedHead` (`serve/state.py`): a classifier for the first route, an
extractive QA model for the second; any other model is a 400 naming the route that serves it.
A route is parse → admit → run under `metering.settling`, as /v1/embeddings: the request
reserves the tokens the model will read (counted before any model work, in the token layout
`infer.heads` uses: texts truncated to the context, QA contexts split into windows), pays for
them (no completion tokens), and gets one ledger row under its route's path. Nothing is
generated, so, as for /v1/embeddings, no content policy applies.

The head runs in a worker thread (`infer.heads` is synchronous torch code), one request at a
time per model (`ServedHead.lock`), so the event loop keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter

from lmforge.data.features import qa_windows, text_features
from lmforge.errors import LmforgeError
from lmforge.infer.heads import answer, classify
from lmforge.model.heads import SequenceClassifier, SpanQA
from lmforge.registry.keys import KeyRecord
from lmforge.serve.auth import Call, allowed_served
from lmforge.serve.errors import OpenAIError, bad_request
from lmforge.serve.metering import Used, admit, settling
from lmforge.serve.protocol import MAX_CLASSIFY_INPUTS, AnswerRequest, ClassificationRequest
from lmforge.serve.state import ServedHead, ServerState, State

router = APIRouter()

T = TypeVar("T")


def _allowed_head(state: ServerState, key: KeyRecord | None, name: str, task: str) -> ServedHead:
    allowed_served(state, key, name)  # the key's 404 first, as for every other route
    return state.head(name, task)


def _locked(served: ServedHead, run: Callable[[], T]) -> T:
    """RUN under SERVED's lock (call in a worker thread): one forward pass per model at once."""
    with served.lock:
        return run()


def _usage(tokens: int) -> dict[str, int]:
    return {"prompt_tokens": tokens, "total_tokens": tokens}


# ---------------------------------------------------------------------------------------------
# /v1/classifications


@router.post("/v1/classifications")
async def classifications(body: ClassificationRequest, state: State, caller: Call) -> Any:
    served = _allowed_head(state, caller.key, body.model, "classify")
    model = served.model
    if not isinstance(model, SequenceClassifier):  # a "classify" head is one (model/heads.py)
        raise OpenAIError(500, f"{served.name} has no classification head")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not 1 <= len(texts) <= MAX_CLASSIFY_INPUTS:
        raise bad_request(
            f"input must hold 1 to {MAX_CLASSIFY_INPUTS} texts, got {len(texts)}", "input"
        )
    for i, text in enumerate(texts):
        if not text:
            where = "input" if isinstance(body.input, str) else f"input[{i}]"
            raise bad_request(f"{where} is empty", "input")
    tokenizer, max_len = served.tokenizer, model.config.max_seq_len

    def count() -> int:  # what `classify` reads: each text truncated to the context
        return sum(len(text_features(tokenizer, t, max_len=max_len)) for t in texts)

    tokens = await asyncio.to_thread(count)
    meter = await admit(state, caller, served, "/v1/classifications", tokens, 0)
    async with settling(meter):
        predictions = await asyncio.to_thread(
            _locked, served, lambda: classify(model, tokenizer, texts)
        )
        tokens = sum(p.tokens for p in predictions)
        meter.used = Used(prompt_tokens=tokens)
    return {
        "id": f"clf-{uuid.uuid4().hex}",
        "object": "list",
        "model": served.name,
        "data": [
            {"object": "classification", "index": i, "label": p.label, "scores": p.scores}
            for i, p in enumerate(predictions)
        ],
        "usage": _usage(tokens),
    }


# ---------------------------------------------------------------------------------------------
# /v1/answers


@router.post("/v1/answers")
async def answers(body: AnswerRequest, state: State, caller: Call) -> Any:
    served = _allowed_head(state, caller.key, body.model, "qa")
    model = served.model
    if not isinstance(model, SpanQA):  # a "qa" head is one (model/heads.py)
        raise OpenAIError(500, f"{served.name} has no question-answering head")
    if not body.question.strip():
        raise bad_request("question is empty", "question")
    if not body.context:
        raise bad_request("context is empty", "context")
    tokenizer = served.tokenizer
    # The windows `answer` will read, with its settings (the head's, else the model's context).
    max_len = int(model.head.extra.get("max_len") or model.config.max_seq_len)
    stride = int(model.head.extra.get("doc_stride", 128))

    def count() -> int:
        windows = qa_windows(
            tokenizer, body.question, body.context, max_len=max_len, doc_stride=stride
        )
        return sum(len(w.ids) for w in windows)

    try:
        tokens = await asyncio.to_thread(count)
    except LmforgeError as e:  # the model's window leaves no room for this question
        raise bad_request(str(e), "question") from e
    meter = await admit(state, caller, served, "/v1/answers", tokens, 0)
    async with settling(meter):
        found = await asyncio.to_thread(
            _locked,
            served,
            lambda: answer(
                model,
                tokenizer,
                body.question,
                body.context,
                max_answer_tokens=body.max_answer_tokens,
            ),
        )
        meter.used = Used(prompt_tokens=found.tokens)
    return {
        "id": f"ans-{uuid.uuid4().hex}",
        "object": "answer",
        "model": served.name,
        "answer": found.text,
        "start": found.start,
        "end": found.end,
        "score": found.score,
        "usage": _usage(found.tokens),
    }
