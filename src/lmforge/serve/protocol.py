"""OpenAI's request schemas (and vLLM's tokenizer routes) as pydantic models, strictly typed.

Strict mode: a string where a number belongs is a 400, not a silent conversion. Unknown fields
are ignored, as OpenAI does. Value checks shared with the CLI (temperature range, top_p, …)
happen when a request becomes `SamplingParams`, whose errors name the field.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16
"""Choices per request at most (`n`)."""


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


Stop = str | list[str] | None
TokenIds = list[Annotated[int, Field(ge=0)]]


class _Sampling(_Request):
    """The sampling fields both generation routes share (OpenAI's plus vLLM's extras)."""

    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: Stop = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None  # token id (as JSON keys are) → -100..100
    user: str | None = None
    # vLLM's extras
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: TokenIds | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None  # top alternatives per position, 0..5 (OpenAI), 0..20 here
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(_Request):
    """One part of a message's content ({"type": "text", "text": …}). Other kinds pass schema
    validation and are refused by `tokenizer.chat.validate_messages` with a message naming them."""

    model_config = ConfigDict(strict=True, extra="allow")
    text: str | None = None


class ChatMessage(_Request):
    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class EmbeddingRequest(_Request):
    model: str
    input: str | list[str] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: TokenIds


# Task endpoints for fine-tuned heads (lmforge's own; see serve/task_routes.py)

MAX_CLASSIFY_INPUTS = 256
"""Texts per /v1/classifications request at most (as /v1/embeddings)."""


class ClassificationRequest(_Request):
    model: str
    input: str | list[str]  # 1..MAX_CLASSIFY_INPUTS non-empty texts, each truncated to the context
    user: str | None = None


class AnswerRequest(_Request):
    model: str
    question: str
    context: str
    max_answer_tokens: Annotated[int, Field(ge=1, le=64)] = 30
    user: str | None = None
