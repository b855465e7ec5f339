"""The OpenAI-compatible routes: completions, chat completions, embeddings, models, and the
tokenizer routes lm-evaluation-harness probes (/tokenize, /detokenize, /tokenizer_info).

Here: OpenAI's request shapes → token ids and `SamplingParams` (with the checks that name the
parameter, against the engine's `info`: its vocabulary, context and queue), and the results →
OpenAI's response and chunk shapes. Each route is parse → admit → `choices.generate` (or
`stream_response`) → format; running the choices, the content policy and settling the bill are
`choices.py`'s job; the engine, an `EngineClient`, sees token ids only. The routes take the
server's state, the caller and the moderation service as dependencies; the HTTP request goes
no further than them.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter

from lmforge.errors import LmforgeError
from lmforge.infer.generate import check_prompt
from lmforge.infer.params import SamplingParams, check_logit_bias_ids
from lmforge.infer.request import TokenLogprob
from lmforge.registry.keys import KeyRecord
from lmforge.serve.auth import Call, Key, allowed_model, allowed_served
from lmforge.serve.choices import Choice, Generation, Piece, generate, stream_response, usage
from lmforge.serve.context import Caller
from lmforge.serve.errors import bad_request
from lmforge.serve.metering import Used, admit, settling
from lmforge.serve.moderation import Moderation, ModerationService
from lmforge.serve.protocol import (
    MAX_N,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
from lmforge.serve.state import ServedHead, ServedModel, ServerState, State
from lmforge.tokenizer.chat import validate_messages

router = APIRouter()


# ---------------------------------------------------------------------------------------------
# Requests → sampling params


def _sampling(
    body: CompletionRequest | ChatCompletionRequest,
    served: ServedModel,
    prompt_lens: Sequence[int],
    max_tokens: int | None,
    *,
    logprobs: bool,
    top_logprobs: int,
    echo: bool = False,
) -> SamplingParams:
    if not 1 <= body.n <= MAX_N:
        raise bad_request(f"n must be between 1 and {MAX_N}, got {body.n}", "n")
    queue = served.engine.info.max_queue  # more choices would 503 on every retry
    if len(prompt_lens) * body.n > queue:
        raise bad_request(
            f"{len(prompt_lens)} prompt(s) × n {body.n} is over the {queue} requests this "
            "server queues at once",
            "prompt" if len(prompt_lens) > 1 else "n",
        )
    longest = max(prompt_lens)
    room = served.max_model_len - longest
    if max_tokens is None:
        max_tokens = room
    if max_tokens < 0:
        raise bad_request(f"max_tokens must be >= 0, got {max_tokens}", "max_tokens")
    if longest + max_tokens > served.max_model_len:
        raise bad_request(
            f"this model's maximum context length is {served.max_model_len} tokens; the prompt "
            f"has {longest} and max_tokens asks for {max_tokens} more",
            "max_tokens",
        )
    if max_tokens == 0 and not echo:
        raise bad_request("max_tokens 0 is only meaningful with echo", "max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 16:
        raise bad_request(f"stop: at most 16 strings, got {len(stop)}", "stop")
    temperature = 1.0 if body.temperature is None else body.temperature
    if not 0 <= temperature <= 2:  # NaN too: every comparison with it is false
        raise bad_request(f"temperature must be in [0, 2], got {temperature}", "temperature")
    stop_ids = list(body.stop_token_ids or [])
    if not body.ignore_eos:
        stop_ids += served.stop_token_ids
    return SamplingParams(
        logit_bias=_logit_bias(body.logit_bias, served.engine.info.vocab_size),
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        seed=body.seed,
        stop=stop,
        stop_token_ids=stop_ids,  # the model's EOS ids only without ignore_eos (vLLM's meaning)
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        n=body.n,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        echo=echo,
    )


def _logit_bias(raw: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's `logit_bias` with its token ids (JSON object keys) as ints, checked against the
    vocabulary here; `SamplingParams` checks the values (its errors are 400s naming it too)."""
    if raw is None:
        return None
    for key in raw:
        if not key.isascii() or not key.isdigit():
            raise bad_request(f"logit_bias: {key!r} is not a token id", "logit_bias")
    bias = {int(key): value for key, value in raw.items()}
    check_logit_bias_ids(bias, vocab_size)
    return bias or None


async def _admit(
    state: ServerState,
    caller: Caller,
    moderation: ModerationService,
    served: ServedModel,
    endpoint: str,
    prompts: list[list[int]],
    params: SamplingParams,
    prompt_param: str,
) -> Generation:
    """Admit a generation: it reserves its prompts and up to max_tokens per choice."""
    prompt_tokens = sum(len(p) for p in prompts)
    reserved = len(prompts) * params.n * params.max_tokens
    meter = await admit(state, caller, served, endpoint, prompt_tokens, reserved)
    return Generation(
        served=served,
        prompts=prompts,
        params=params,
        caller=caller,
        meter=meter,
        moderation=moderation,
        prompt_param=prompt_param,
    )


def _include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _check_ids(ids: list[int], served: ServedModel, param: str) -> list[int]:
    """IDS as a prompt the model can take (`check_prompt`, the one check of the server's
    requests), else a 400 naming PARAM."""
    info = served.engine.info
    try:
        check_prompt(ids, info.max_model_len, info.vocab_size)
    except LmforgeError as e:
        raise bad_request(str(e), param) from e
    return ids


# ---------------------------------------------------------------------------------------------
# /v1/completions


def _to_ids(
    raw: str | list[str] | list[int] | list[list[int]], served: ServedModel
) -> list[list[int]]:
    """A prompt or input as OpenAI allows it — text, texts, token ids, lists of token ids —
    as lists of token ids."""
    if isinstance(raw, str):
        return [served.tokenizer.encode(raw)]
    out: list[list[int]] = []
    flat: list[int] = []
    for item in raw:
        if isinstance(item, str):
            out.append(served.tokenizer.encode(item))
        elif isinstance(item, int):
            flat.append(item)
        else:
            out.append(list(item))
    if flat and out:
        raise bad_request("mix of token ids and texts or lists", "prompt")
    return [flat] if flat else out


def _completion_prompts(body: CompletionRequest, served: ServedModel) -> list[list[int]]:
    ids = _to_ids(body.prompt, served)
    if not ids:
        raise bad_request("prompt is empty", "prompt")
    return [_check_ids(p, served, "prompt") for p in ids]


def _completion_logprobs(
    served: ServedModel,
    token_ids: list[int],
    logprobs: list[TokenLogprob | None],
    offset: int,
    top: int,
) -> dict[str, Any]:
    tok = served.tokenizer
    tokens = [tok.decode([t], skip_special_tokens=False) for t in token_ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    top_lists: list[dict[str, float] | None] = []
    for lp in logprobs:
        if lp is None:
            top_lists.append(None)
        else:
            alts: dict[str, float] = {}
            for t, v in lp.top[:top]:  # most likely first: a token text keeps its best value
                alts.setdefault(tok.decode([t], skip_special_tokens=False), v)
            top_lists.append(alts)
    return {
        "tokens": tokens,
        "token_logprobs": [None if lp is None else lp.logprob for lp in logprobs],
        "top_logprobs": top_lists,
        "text_offset": offsets,
    }


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest, state: State, caller: Call, moderation: Moderation
) -> Any:
    served = allowed_model(state, caller.key, body.model)
    if body.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of other than n is not supported", "best_of")
    if body.logprobs is not None and not 0 <= body.logprobs <= 20:
        raise bad_request("logprobs must be between 0 and 20", "logprobs")
    prompts = _completion_prompts(body, served)
    want_logprobs = body.logprobs is not None
    top = body.logprobs or 0
    params = _sampling(
        body,
        served,
        [len(p) for p in prompts],
        body.max_tokens,
        logprobs=want_logprobs,
        top_logprobs=top,
        echo=body.echo,  # prompt logprobs also mark the first streamed piece (echoed text)
    )
    gen = await _admit(
        state, caller, moderation, served, "/v1/completions", prompts, params, "prompt"
    )
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": served.name}

    def logprobs_of(choice_prompt: list[int], choice: Choice) -> Any:
        if not want_logprobs:
            return None
        ids = list(choice.token_ids)
        lps: list[TokenLogprob | None] = list(choice.logprobs)
        if body.echo:
            ids = choice_prompt + ids
            lps = list(choice.prompt_logprobs or [None] * len(choice_prompt)) + lps
        return _completion_logprobs(served, ids, lps, 0, top)

    def prompt_text(ids: list[int]) -> str:
        return served.tokenizer.decode(ids, skip_special_tokens=False)

    if body.stream:
        choice_prompts = [p for p in prompts for _ in range(body.n)]

        def chunk(piece: Piece) -> dict[str, Any]:
            text = piece.text
            lp = None
            if piece.prompt_logprobs is not None and body.echo:
                text = prompt_text(choice_prompts[piece.index]) + text
            if want_logprobs:
                ids = list(piece.token_ids)
                lps: list[TokenLogprob | None] = list(piece.logprobs)
                if piece.prompt_logprobs is not None and body.echo:
                    ids = choice_prompts[piece.index] + ids
                    lps = list(piece.prompt_logprobs) + lps
                lp = _completion_logprobs(served, ids, lps, 0, top)
            c = {
                "index": piece.index,
                "text": text,
                "logprobs": lp,
                "finish_reason": piece.finish_reason,
            }
            return {**head, "choices": [c]}

        usage_head = head if _include_usage(body) else None
        return await stream_response(gen, chunk=chunk, first_chunks=[], usage_head=usage_head)

    choices = await generate(gen)
    data = []
    for choice in choices:
        text = (prompt_text(choice.prompt_ids) if body.echo else "") + choice.text
        data.append(
            {
                "index": choice.index,
                "text": text,
                "logprobs": logprobs_of(choice.prompt_ids, choice),
                "finish_reason": choice.finish_reason,
            }
        )
    return {**head, "choices": data, "usage": usage(prompts, choices)}


# ---------------------------------------------------------------------------------------------
# /v1/chat/completions


def _chat_logprobs(served: ServedModel, choice_ids: list[int], lps: list[TokenLogprob]) -> Any:
    tok = served.tokenizer

    def entry(tid: int, value: float) -> dict[str, Any]:
        text = tok.decode([tid], skip_special_tokens=False)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**entry(t, lp.logprob), "top_logprobs": [entry(a, v) for a, v in lp.top]}
            for t, lp in zip(choice_ids, lps, strict=False)
        ]
    }


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, state: State, caller: Call, moderation: Moderation
) -> Any:
    served = allowed_model(state, caller.key, body.model)
    if not body.messages:
        raise bad_request("messages must not be empty", "messages")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    try:
        ids = served.tokenizer.encode_chat(validate_messages(messages), add_generation_prompt=True)
    except LmforgeError as e:
        raise bad_request(str(e), "messages") from e
    prompts = [_check_ids(ids, served, "messages")]
    max_tokens = (
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    )
    if max_tokens == 0:
        raise bad_request("max_tokens must be at least 1", "max_tokens")
    params = _sampling(
        body,
        served,
        [len(ids)],
        max_tokens,
        logprobs=body.logprobs,
        top_logprobs=body.top_logprobs or 0,
    )
    gen = await _admit(
        state, caller, moderation, served, "/v1/chat/completions", prompts, params, "messages"
    )
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "chat.completion", "created": created, "model": served.name}

    if body.stream:
        chunk_head = {**head, "object": "chat.completion.chunk"}
        firsts = [
            {
                **chunk_head,
                "choices": [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
            for i in range(body.n)
        ]

        def chunk(piece: Piece) -> dict[str, Any]:
            delta = {"content": piece.text} if piece.text else {}
            lp = _chat_logprobs(served, piece.token_ids, piece.logprobs) if body.logprobs else None
            c = {
                "index": piece.index,
                "delta": delta,
                "logprobs": lp,
                "finish_reason": piece.finish_reason,
            }
            return {**chunk_head, "choices": [c]}

        usage_head = chunk_head if _include_usage(body) else None
        return await stream_response(gen, chunk=chunk, first_chunks=firsts, usage_head=usage_head)

    choices = await generate(gen)
    data = [
        {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": _chat_logprobs(served, c.token_ids, c.logprobs) if body.logprobs else None,
            "finish_reason": c.finish_reason,
        }
        for c in choices
    ]
    return {**head, "choices": data, "usage": usage(prompts, choices)}


# ---------------------------------------------------------------------------------------------
# /v1/embeddings, /v1/models


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, state: State, caller: Call) -> Any:
    served = allowed_model(state, caller.key, body.model)
    inputs = _to_ids(body.input, served)
    if not inputs or len(inputs) > 256:
        raise bad_request("input must hold 1 to 256 items", "input")
    inputs = [_check_ids(ids, served, "input") for ids in inputs]
    if body.dimensions is not None:
        raise bad_request("dimensions is not supported", "dimensions")
    tokens = sum(len(ids) for ids in inputs)
    meter = await admit(state, caller, served, "/v1/embeddings", tokens, 0)
    async with settling(meter):
        vectors = await served.engine.embed(inputs)
        meter.used = Used(prompt_tokens=tokens)
    data = []
    for i, vec in enumerate(vectors):
        value: Any = vec
        if body.encoding_format == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {
        "object": "list",
        "data": data,
        "model": served.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _model_card(m: ServedModel | ServedHead) -> dict[str, Any]:
    card: dict[str, Any] = {
        "id": m.name,
        "object": "model",
        "created": m.created,
        "owned_by": "lmforge",
        "max_model_len": m.max_model_len,
    }
    if isinstance(m, ServedHead):
        card["task"] = m.task  # "classify" (/v1/classifications) or "qa" (/v1/answers)
    return card


@router.get("/v1/models")
async def list_models(state: State, key: Key) -> Any:
    served: list[ServedModel | ServedHead] = [*state.models.values(), *state.heads.values()]
    return {
        "object": "list",
        "data": [_model_card(m) for m in served if key is None or key.allows(m.name)],
    }


@router.get("/v1/models/{name:path}")
async def get_model(name: str, state: State, key: Key) -> Any:
    return _model_card(allowed_served(state, key, name))


# ---------------------------------------------------------------------------------------------
# Tokenizer routes (vLLM's shapes)


def _pick(state: ServerState, key: KeyRecord | None, name: str | None) -> ServedModel:
    if name is None and state.ready and len(state.models) == 1:
        name = next(iter(state.models))
    if name is None:
        raise bad_request("model is required when the server has several", "model")
    return allowed_model(state, key, name)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, state: State, key: Key) -> Any:
    served = _pick(state, key, body.model)
    tokens = served.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": served.max_model_len}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, state: State, key: Key) -> Any:
    served = _pick(state, key, body.model)
    vocab = served.engine.info.vocab_size
    if any(t >= vocab for t in body.tokens):
        raise bad_request(f"token ids must be in 0..{vocab - 1}", "tokens")
    return {"prompt": served.tokenizer.decode(body.tokens, skip_special_tokens=False)}


@router.get("/tokenizer_info")
async def tokenizer_info(state: State, key: Key, model: str | None = None) -> Any:
    served = _pick(state, key, model)
    tok = served.tokenizer
    config = tok.config_dict()
    return {
        "tokenizer_class": config.get("tokenizer_class", "PreTrainedTokenizerFast"),
        "eos_token": tok.eos_token,
        "bos_token": tok.bos_token,
        "pad_token": tok.pad_token,
        "eos_token_id": tok.eos_id,
        "bos_token_id": tok.bos_id,
        "vocab_size": tok.vocab_size,
        "model_max_length": served.max_model_len,
        "chat_template": config.get("chat_template"),
    }
