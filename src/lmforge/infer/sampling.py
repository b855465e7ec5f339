"""`SamplingParams` and `sample`: how the next token is chosen from logits.

First the penalties (`apply_penalties`): OpenAI's presence and frequency penalties on the tokens
generated so far (logit − frequency·count − presence·[count > 0]), and the CTRL / Hugging Face
repetition penalty on every token seen, prompt included (positive logits divided by it,
negative ones multiplied) — the semantics vLLM uses too. Then greedy when temperature is 0;
otherwise temperature, top-k, top-p (nucleus) and min-p filtering, then a draw from a seeded
`torch.Generator`. The parameters themselves live in `params.py` (no torch).
"""

from __future__ import annotations

import torch

from lmforge.infer.params import SamplingParams

__all__ = [
    "SamplingParams",
    "TokenHistory",
    "apply_penalties",
    "filter_logits",
    "make_generator",
    "sample",
]


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """The seeded generator for PARAMS' draws; None when greedy (no draws)."""
    if params.greedy:
        return None
    gen = torch.Generator()
    gen.manual_seed(params.seed if params.seed is not None else torch.seed())
    return gen


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
