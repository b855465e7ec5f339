"""Single-sequence generation: prefill the prompt, then decode token by token with a KV cache.

The batch-1 path behind `lmforge generate`, `lmforge chat` and the Python API. It owns the KV
cache (allocated here, passed to the model) and yields token ids; turning them into text and
applying stop strings is the caller's job.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError
from lmforge.infer.sampling import SamplingParams, sample
from lmforge.model.kv_cache import KVCache
from lmforge.model.transformer import Transformer, decode_step, prefill


@dataclass
class GenerationStep:
    token_id: int
    finish_reason: str | None  # None while going on; "stop" (EOS / stop id) or "length" at the end


def check_prompt(prompt_ids: Sequence[int], max_seq_len: int, vocab_size: int) -> None:
    if not prompt_ids:
        raise LmforgeError("the prompt is empty (no tokens)")
    if len(prompt_ids) >= max_seq_len:
        raise LmforgeError(
            f"the prompt has {len(prompt_ids)} tokens; the model's context is {max_seq_len}"
        )
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise LmforgeError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")


def generate_ids(
    model: Transformer, prompt_ids: Sequence[int], params: SamplingParams
) -> Iterator[GenerationStep]:
    """Yield new tokens one by one; the last step carries the finish reason.

    Stops at a stop token (unless `ignore_eos`), after `max_tokens`, or at the context end.
    """
    cfg = model.config
    check_prompt(prompt_ids, cfg.max_seq_len, cfg.vocab_size)
    if params.max_tokens == 0:
        return
    budget = min(params.max_tokens, cfg.max_seq_len - len(prompt_ids))
    # The last sampled token is never fed back, so the cache needs prompt + budget - 1 slots.
    slots = len(prompt_ids) + budget - 1
    cache = KVCache.allocate(cfg, 1, slots, dtype=model.lm_head.weight.dtype)
    stop_ids = set() if params.ignore_eos else set(params.stop_token_ids)
    generator = params.make_generator()
    # prefill and decode_step enter inference mode themselves: holding it across `yield`
    # would leak the mode into the caller's code between tokens.
    logits = prefill(model, torch.tensor([list(prompt_ids)]), cache)
    pos = len(prompt_ids)
    for i in range(budget):
        tid = int(sample(logits, params, generator)[0])
        if tid in stop_ids:
            yield GenerationStep(tid, "stop")
            return
        if i == budget - 1:
            yield GenerationStep(tid, "length")
            return
        yield GenerationStep(tid, None)
        logits = decode_step(model, torch.tensor([tid]), torch.tensor([pos]), cache)
        pos += 1
