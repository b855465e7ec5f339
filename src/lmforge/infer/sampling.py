"""`SamplingParams` and `sample`: how the next token is chosen from logits.

Greedy when temperature is 0; otherwise temperature, then top-k, top-p (nucleus) and min-p
filtering, then a draw from a seeded `torch.Generator`. Every field is validated with an error
that names it, because these values arrive straight from users (CLI flags, HTTP bodies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

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

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise LmforgeError(f"max_tokens must be an integer >= 0, got {self.max_tokens}")
        if (
            not _is_real(self.temperature)
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise LmforgeError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise LmforgeError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not _is_real(self.top_p) or not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise LmforgeError(f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_real(self.min_p) or not math.isfinite(self.min_p) or not 0 <= self.min_p < 1:
            raise LmforgeError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise LmforgeError(f"seed must be an integer in [0, 2**63), got {self.seed}")
        # A bare str would be taken as one stop string per character.
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise LmforgeError(f"stop must be a list of non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        gen = torch.Generator()
        gen.manual_seed(self.seed if self.seed is not None else torch.seed())
        return gen


def _is_real(value: object) -> bool:
    """int or float: a str or None from a request body must fail validation, not math.isfinite."""
    return isinstance(value, (int, float))


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p applied to logits [B, V]; removed entries are -inf."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.min_p > 0:
        probs = logits.softmax(-1)
        floor = probs.max(-1, keepdim=True).values * params.min_p
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Choose next tokens from logits [B, V] → ids [B]."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, params).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
