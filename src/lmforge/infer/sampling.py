"""How the next token is chosen from logits: the one sampling path of every generator.

`SequenceSampler` holds one sequence's sampling state (its seeded generator, its token
counts for the penalties, its logits processors) and `choose`s each next token:

1. the request's logits processors (`logits.py`: `logit_bias`, grammars), on its own copy of
   the row;
2. the penalties (`apply_penalties`): OpenAI's presence and frequency penalties on the tokens
   generated so far (logit − frequency·count − presence·[count > 0]), and the CTRL / Hugging
   Face repetition penalty on every token seen, prompt included (positive logits divided by
   it, negative ones multiplied) — the semantics vLLM uses too;
3. a check: a NaN, or no token left to choose, fails this request (`SamplingError`);
4. greedy when temperature is 0; otherwise temperature, top-k, top-p (nucleus) and min-p
   filtering, then a draw from the seeded `torch.Generator`.

Extreme but valid parameters behave as their limits: logits are shifted so that the best is 0
before dividing by the temperature (in float64), so a temperature of 5e-324 is greedy (ties
drawn uniformly) rather than inf/inf; a tiny repetition penalty pushes seen tokens to the
float32 maximum, not to inf. The engine (`runner.py`), `lmforge generate` (`generate.py`) and
the Python API all sample here. The parameters live in `params.py` (no torch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmforge.errors import LmforgeError
from lmforge.infer.logits import LogitBias, LogitsProcessor, apply_processors
from lmforge.infer.params import SamplingParams

__all__ = [
    "SamplingError",
    "SamplingParams",
    "SequenceSampler",
    "TokenHistory",
    "apply_penalties",
    "filter_logits",
    "make_generator",
    "sample",
]

_F32_MAX = torch.finfo(torch.float32).max


class SamplingError(LmforgeError):
    """This sequence cannot be sampled (a NaN, every token masked, a processor's error)."""


def make_generator(
    params: SamplingParams, device: torch.device | str = "cpu"
) -> torch.Generator | None:
    """The seeded generator for PARAMS' draws; None when greedy (no draws)."""
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed % 2**64 if params.seed is not None else torch.seed())
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
        wide = logits.double()  # a penalty near 0 underflows to 0 in float32
        scaled = torch.where(
            wide > 0, wide / params.repetition_penalty, wide * params.repetition_penalty
        )
        logits = torch.where(seen, scaled, wide).clamp(max=_F32_MAX).float()
    if params.frequency_penalty or params.presence_penalty:
        counts = output_counts.to(logits.dtype)
        logits = logits - params.frequency_penalty * counts
        logits = logits - params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


class TokenHistory:
    """Per-row token counts for the penalties: the prompt (seen) and the output (counted)."""

    def __init__(
        self, prompt_ids: list[list[int]], vocab_size: int, device: torch.device | str = "cpu"
    ) -> None:
        rows = len(prompt_ids)
        self.output_counts = torch.zeros(rows, vocab_size, dtype=torch.int32, device=device)
        self.seen = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)
        for row, ids in enumerate(prompt_ids):
            if ids:
                self.seen[row, torch.tensor(ids, device=device)] = True

    def add(self, token_ids: torch.Tensor) -> None:
        """Record one generated token per row: ids [B]."""
        token_ids = token_ids.to(self.seen.device)
        rows = torch.arange(token_ids.shape[0], device=self.seen.device)
        self.output_counts[rows, token_ids] += 1
        self.seen[rows, token_ids] = True


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p applied to logits [B, V]; removed entries are -inf.

    The best logit of each row becomes 0 before the division by the temperature (in float64),
    so any temperature > 0 works: the others go to -inf as it approaches 0 (the greedy limit).
    """
    wide = logits.double()
    top = wide.max(-1, keepdim=True).values
    logits = ((wide - top) / params.temperature).float()  # max → 0, the rest ≤ 0 or -inf
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.min_p > 0:
        probs = logits.softmax(-1)
        floor = probs.max(-1, keepdim=True).values * params.min_p
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        drop_sorted[..., 0] = False  # a top_p below float32's smallest would drop it too
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


class SequenceSampler:
    """One sequence's sampling state and the path from its logits row to its next token."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        vocab_size: int,
        *,
        processors: Sequence[LogitsProcessor] = (),
        device: torch.device | str = "cpu",
    ) -> None:
        self.params = params
        self.prompt_ids = prompt_ids
        self.vocab_size = vocab_size
        self.processors: list[LogitsProcessor] = list(processors)
        if params.logit_bias:
            self.processors.insert(0, LogitBias(params.logit_bias, vocab_size, device))
        self.generator = make_generator(params, device)
        self.history = (
            TokenHistory([list(prompt_ids)], vocab_size, device) if params.penalized else None
        )

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing between the logits and argmax (a batch can take one argmax)."""
        return self.params.greedy and self.history is None and not self.processors

    def choose(self, logits: torch.Tensor, output_ids: Sequence[int]) -> int:
        """The next token after OUTPUT_IDS from this sequence's logits row [V]."""
        row = logits.float()
        if self.processors:
            try:
                row = apply_processors(self.processors, self.prompt_ids, output_ids, row)
            except SamplingError:
                raise
            except Exception as e:
                raise SamplingError(f"a logits processor failed: {type(e).__name__}: {e}") from e
            row = row.clamp(max=_F32_MAX)  # +inf would make inf - inf below
        row = row[None]  # [1, V]
        if self.history is not None:
            row = apply_penalties(row, self.history.output_counts, self.history.seen, self.params)
        if bool(torch.isnan(row).any()):
            raise SamplingError("the logits hold NaN")
        if not bool((row > float("-inf")).any()):
            raise SamplingError("no token is left to choose (every one is masked)")
        token = self.pick(row)
        if self.history is not None:
            self.history.add(torch.tensor([token]))
        return token

    def pick(self, row: torch.Tensor) -> int:
        """Greedy or a draw from ROW [1, V] (finite or -inf entries, at least one finite)."""
        token = int(sample(row, self.params, self.generator)[0])
        if not 0 <= token < row.shape[-1]:
            raise SamplingError(f"the sampler chose {token}, outside the vocabulary")
        return token
