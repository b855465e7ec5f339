"""`SamplingParams` and `sample`: how the next token is chosen from logits.

First the penalties (`apply_penalties`): OpenAI's presence and frequency penalties on the tokens
generated so far (logit − frequency·count − presence·[count > 0]), and the CTRL / Hugging Face
repetition penalty on every token seen, prompt included (positive logits divided by it,
negative ones multiplied) — the semantics vLLM uses too. Then greedy when temperature is 0;
otherwise temperature, top-k, top-p (nucleus) and min-p filtering, then a draw from a seeded
`torch.Generator`. Every field is validated with an error that names it, because these values
arrive straight from users (CLI flags, HTTP bodies).
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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or not -2 <= value <= 2:
                raise LmforgeError(f"{name} must be in [-2, 2], got {value}")
        penalty = self.repetition_penalty
        if not _is_real(penalty) or not math.isfinite(penalty) or not 0 < penalty <= 10:
            raise LmforgeError(f"repetition_penalty must be in (0, 10], got {penalty}")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise LmforgeError(f"n must be an integer >= 1, got {self.n}")
        if not isinstance(self.logprobs, bool):
            raise LmforgeError(f"logprobs must be true or false, got {self.logprobs!r}")
        top = self.top_logprobs
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 20:
            raise LmforgeError(f"top_logprobs must be an integer in [0, 20], got {top}")
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

    def make_generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        gen = torch.Generator()
        gen.manual_seed(self.seed if self.seed is not None else torch.seed())
        return gen


def _is_real(value: object) -> bool:
    """int or float: a str or None from a request body must fail validation, not math.isfinite."""
    return isinstance(value, (int, float))


def apply_penalties(
    logits: torch.Tensor,  # [B, V]
    output_counts: torch.Tensor,  # [B, V] times each token was generated so far
    seen: torch.Tensor,  # [B, V] bool: in the prompt or generated
    params: SamplingParams,
) -> torch.Tensor:
    """Logits [B, V] (float32) after the repetition, frequency and presence penalties."""
    logits = logits.float()
    if params.repetition_penalty != 1.0:
        scaled = torch.where(
            logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty
        )
        logits = torch.where(seen, scaled, logits)
    if params.frequency_penalty or params.presence_penalty:
        counts = output_counts.to(logits.dtype)
        logits = logits - params.frequency_penalty * counts
        logits = logits - params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


class TokenHistory:
    """Per-row token counts for the penalties: the prompt (seen) and the output (counted)."""

    def __init__(self, prompt_ids: list[list[int]], vocab_size: int) -> None:
        rows = len(prompt_ids)
        self.output_counts = torch.zeros(rows, vocab_size, dtype=torch.int32)
        self.seen = torch.zeros(rows, vocab_size, dtype=torch.bool)
        for row, ids in enumerate(prompt_ids):
            if ids:
                self.seen[row, torch.tensor(ids)] = True

    def add(self, token_ids: torch.Tensor) -> None:
        """Record one generated token per row: ids [B]."""
        rows = torch.arange(token_ids.shape[0])
        self.output_counts[rows, token_ids] += 1
        self.seen[rows, token_ids] = True


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
