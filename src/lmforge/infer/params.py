"""`SamplingParams`: how one sequence is generated — validated, and free of torch.

The fields follow OpenAI's and vLLM's names. Every value is checked with an error that names
the field, because these values arrive straight from users (CLI flags, HTTP bodies). This module
imports no torch, so the scheduler (pure Python) can read `max_tokens` and the stop ids.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from lmforge.errors import LmforgeError


@dataclass
class SamplingParams:
    max_tokens: int = 256
    """New tokens to generate at most (0 = none; generation also stops at the context end)."""
    temperature: float = 0.0
    """0 = greedy; higher = more random."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p (1 = off)."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p × the top token's probability (0 = off)."""
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    """Stop strings: generation ends before the first one (applied to text by the caller)."""
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated ([-2, 2], OpenAI)."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence from the logit of generated tokens ([-2, 2], OpenAI)."""
    repetition_penalty: float = 1.0
    """> 1 discourages any token seen in the prompt or output (CTRL; 1 = off)."""
    n: int = 1
    """Completions per prompt (each its own sequence; the server caps it)."""
    logprobs: bool = False
    """Return the log-probability of each chosen token."""
    top_logprobs: int = 0
    """Also return the k most likely alternatives per position (0-20)."""
    echo: bool = False
    """Also return the log-probability of every prompt token (the first has none)."""
    logit_bias: dict[int, float] | None = None
    """Token id → value in [-100, 100] added to its logit before sampling (OpenAI's meaning:
    -100 bans the token, +100 forces it). The engine checks the ids against its vocabulary."""

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 0:
            raise LmforgeError(f"max_tokens must be an integer >= 0, got {self.max_tokens}")
        if (
            not _is_real(self.temperature)
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise LmforgeError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise LmforgeError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not _is_real(self.top_p) or not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise LmforgeError(f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_real(self.min_p) or not math.isfinite(self.min_p) or not 0 <= self.min_p < 1:
            raise LmforgeError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise LmforgeError(f"seed must be an integer in [-2**63, 2**64), got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or not -2 <= value <= 2:
                raise LmforgeError(f"{name} must be in [-2, 2], got {value}")
        penalty = self.repetition_penalty
        if not _is_real(penalty) or not math.isfinite(penalty) or not 0 < penalty <= 10:
            raise LmforgeError(f"repetition_penalty must be in (0, 10], got {penalty}")
        if not _is_int(self.n) or self.n < 1:
            raise LmforgeError(f"n must be an integer >= 1, got {self.n}")
        for name in ("logprobs", "echo", "ignore_eos"):
            if not isinstance(getattr(self, name), bool):
                raise LmforgeError(f"{name} must be true or false, got {getattr(self, name)!r}")
        top = self.top_logprobs
        if not _is_int(top) or not 0 <= top <= 20:
            raise LmforgeError(f"top_logprobs must be an integer in [0, 20], got {top}")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise LmforgeError(
                f"stop_token_ids must be a list of token ids >= 0, got {self.stop_token_ids!r}"
            )
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise LmforgeError(
                    f"logit_bias must map token ids to numbers, got {self.logit_bias!r}"
                )
            for token, bias in self.logit_bias.items():
                if not _is_int(token) or token < 0:
                    raise LmforgeError(f"logit_bias: {token!r} is not a token id (an integer >= 0)")
                if not _is_real(bias) or not math.isfinite(bias) or not -100 <= bias <= 100:
                    raise LmforgeError(
                        f"logit_bias: the bias of token {token} must be in [-100, 100], "
                        f"got {bias!r}"
                    )
        # A bare str would be taken as one stop string per character.
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise LmforgeError(f"stop must be a list of non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty) or (
            self.repetition_penalty != 1.0
        )


def check_logit_bias_ids(bias: Mapping[int, float], vocab_size: int) -> None:
    """Every token id of a `logit_bias` in the vocabulary (the engine's and the route's check)."""
    bad = [t for t in bias if not 0 <= t < vocab_size]
    if bad:
        raise LmforgeError(
            f"logit_bias: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})"
        )


def _is_real(value: object) -> bool:
    """int or float: a str or None from a request body must fail validation, not math.isfinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    """An int that is not a bool (JSON true must not pass for 1)."""
    return isinstance(value, int) and not isinstance(value, bool)
