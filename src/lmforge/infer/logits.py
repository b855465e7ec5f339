"""Per-request logits processors: the hook between the model's logits and the sampler.

A processor is any callable `(prompt_ids, output_ids, logits) -> logits | allowed` for one
request: it sees the request's tokens so far and its logits row [V] (float32, its own copy),
and returns either new logits [V] or a bool mask [V] of the tokens allowed next (a grammar's
answer; the others become -inf). Processors run first in the one sampling path
(`sampling.SequenceSampler`, shared by the engine, `lmforge generate` and the Python API),
before penalties and temperature. A processor that raises, or leaves nothing finite to choose,
fails its own request only.

Built in: `LogitBias`, OpenAI's `logit_bias`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from lmforge.errors import LmforgeError
from lmforge.infer.params import check_logit_bias_ids


class LogitsProcessor(Protocol):
    def __call__(
        self, prompt_ids: Sequence[int], output_ids: Sequence[int], logits: torch.Tensor
    ) -> torch.Tensor:
        """New logits [V], or a bool mask [V] of the allowed tokens."""
        ...


def apply_processors(
    processors: Sequence[LogitsProcessor],
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    logits: torch.Tensor,
) -> torch.Tensor:
    """LOGITS [V] after every processor in order."""
    for processor in processors:
        result = processor(prompt_ids, output_ids, logits)
        if not isinstance(result, torch.Tensor) or result.shape != logits.shape:
            raise LmforgeError(
                f"logits processor {_name(processor)} returned "
                f"{getattr(result, 'shape', type(result).__name__)}, not a tensor of shape "
                f"{tuple(logits.shape)}"
            )
        if result.dtype == torch.bool:
            logits = logits.masked_fill(~result, float("-inf"))
        else:
            logits = result.float()
    return logits


def _name(processor: object) -> str:
    return getattr(processor, "__name__", type(processor).__name__)


BAN, FORCE = -100.0, 100.0


class LogitBias:
    """OpenAI's `logit_bias`: token id → bias in [-100, 100] added to its logit. The two ends
    mean what OpenAI documents: -100 bans the token, +100 makes it the only choice (among the
    tokens at +100, if several)."""

    def __init__(
        self, bias: Mapping[int, float], vocab_size: int, device: torch.device | str = "cpu"
    ) -> None:
        check_logit_bias_ids(bias, vocab_size)
        forced = [t for t, b in bias.items() if b >= FORCE]
        banned = [t for t, b in bias.items() if b <= BAN]
        added = {t: b for t, b in bias.items() if BAN < b < FORCE and b}
        self.forced = torch.tensor(forced, dtype=torch.long, device=device)
        self.banned = torch.tensor(banned, dtype=torch.long, device=device)
        self.ids = torch.tensor(list(added), dtype=torch.long, device=device)
        self.values = torch.tensor(list(added.values()), dtype=torch.float32, device=device)

    def __call__(
        self, prompt_ids: Sequence[int], output_ids: Sequence[int], logits: torch.Tensor
    ) -> torch.Tensor:
        if self.ids.numel():
            logits = logits.index_add(0, self.ids, self.values)
        if self.banned.numel():
            logits = logits.index_fill(0, self.banned, float("-inf"))
        if self.forced.numel():
            only = torch.full_like(logits, float("-inf"))
            logits = only.index_copy(0, self.forced, logits.index_select(0, self.forced) + FORCE)
        return logits
