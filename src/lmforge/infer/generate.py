"""Single-sequence generation: prefill the prompt, then decode token by token with a KV cache.

The batch-1 path behind `lmforge generate`, `lmforge chat` and the Python API. It owns the KV
cache (allocated here, passed to the model) and yields token ids; turning them into text and
applying stop strings is the caller's job. An LSTM model takes the same path with its
recurrent state in place of the KV cache, and has no context end.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError
from lmforge.infer.logits import LogitsProcessor
from lmforge.infer.sampling import SamplingParams, SequenceSampler
from lmforge.model import lstm
from lmforge.model.devices import model_device
from lmforge.model.kv_cache import KVCache
from lmforge.model.lstm import LSTMLanguageModel
from lmforge.model.transformer import Transformer, decode_step, prefill


@dataclass
class GenerationStep:
    token_id: int
    finish_reason: str | None  # None while going on; "stop" (EOS / stop id) or "length" at the end


def context_length(model: Transformer | LSTMLanguageModel) -> int | None:
    """The most tokens (prompt + completion) MODEL can attend to; None: no limit (an LSTM,
    whose `max_seq_len` is only its training context)."""
    if isinstance(model, LSTMLanguageModel):
        return None
    return model.config.max_seq_len


def check_prompt(prompt_ids: Sequence[int], max_seq_len: int | None, vocab_size: int) -> None:
    """A non-empty prompt of ids in the vocabulary that leaves room for one new token
    (MAX_SEQ_LEN None: any length)."""
    if not prompt_ids:
        raise LmforgeError("the prompt is empty (no tokens)")
    if max_seq_len is not None and len(prompt_ids) >= max_seq_len:
        raise LmforgeError(
            f"the prompt has {len(prompt_ids)} tokens; the model's context is {max_seq_len}"
        )
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise LmforgeError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")


def generate_ids(
    model: Transformer | LSTMLanguageModel,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    processors: Sequence[LogitsProcessor] = (),
) -> Iterator[GenerationStep]:
    """Yield new tokens one by one; the last step carries the finish reason.

    Stops at a stop token (unless `ignore_eos`), after `max_tokens`, or at the context end
    (a Transformer's `max_seq_len`; an LSTM has none). Tokens are chosen by the one sampling
    path (`SequenceSampler`: PROCESSORS and `logit_bias`, penalties, temperature, …); a
    sampling failure raises `SamplingError`.
    """
    context = context_length(model)
    check_prompt(prompt_ids, context, model.config.vocab_size)
    device = model_device(model)
    sampler = SequenceSampler(
        params, list(prompt_ids), model.config.vocab_size, processors=processors, device=device
    )
    if params.max_tokens == 0:
        return
    budget = params.max_tokens
    if context is not None:
        budget = min(budget, context - len(prompt_ids))
    stop_ids = set() if params.ignore_eos else set(params.stop_token_ids)
    # prefill and decode_step enter inference mode themselves: holding it across `yield`
    # would leak the mode into the caller's code between tokens.
    prompt = torch.tensor([list(prompt_ids)], device=device)
    if isinstance(model, LSTMLanguageModel):
        logits, state = lstm.prefill(model, prompt)
    else:
        # The last sampled token is never fed back, so the cache needs prompt + budget - 1 slots.
        slots = len(prompt_ids) + budget - 1
        dtype = model.model.embed_tokens.weight.dtype  # the activations' (not a quantized head's)
        cache = KVCache.allocate(model.config, 1, slots, dtype=dtype, device=device)
        logits = prefill(model, prompt, cache)
    pos = len(prompt_ids)
    output: list[int] = []
    for i in range(budget):
        with torch.inference_mode():
            tid = sampler.choose(logits[0], output)
        output.append(tid)
        if tid in stop_ids:
            yield GenerationStep(tid, "stop")
            return
        if i == budget - 1:
            yield GenerationStep(tid, "length")
            return
        yield GenerationStep(tid, None)
        ids = torch.tensor([tid], device=device)
        if isinstance(model, LSTMLanguageModel):
            logits, state = lstm.decode_step(model, ids, state)
        else:
            logits = decode_step(model, ids, torch.tensor([pos], device=device), cache)
        pos += 1
