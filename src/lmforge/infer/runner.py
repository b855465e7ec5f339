"""`ModelRunner`: runs one scheduled step on the model and samples the next tokens.

It owns the paged KV cache (`PagedKVCache`: the pool of blocks the scheduler hands out) and
passes each forward call a `PagedBatch` — the rows' block tables and the cache slot of every
new token. A step is:

- one forward over the decodes: each decoding request feeds its last sampled token at its own
  position, [B, 1];
- the prefill chunks (first chunks, continued ones and recomputes alike), grouped into
  right-padded batches [P, T] while padding stays small: one pass over the weights for
  several prompts. Padding tokens write to the cache's trash slot and read nothing real.

Then, for each chunk that reaches its request's last token, the next token is chosen by the
request's `SequenceSampler` (processors, penalties, temperature…), greedy rows without any of
that by one argmax over the batch. A failure there — a processor that raises, a NaN, nothing
left to choose — fails that request alone (`StepResult.failed`). Log-probabilities are those
of the model (before processors, penalties and temperature).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lmforge.infer.logits import LogitsProcessor
from lmforge.infer.request import Request, TokenLogprob
from lmforge.infer.sampling import SamplingError, SequenceSampler
from lmforge.infer.scheduler import Chunk, Sampled, SchedulerConfig, SchedulerOutput
from lmforge.model.devices import model_device
from lmforge.model.kv_cache import PagedKVCache
from lmforge.model.transformer import Transformer

MAX_PADDING = 0.25
"""A prefill batch takes another chunk while its padding stays under this share of its tokens."""


@dataclass
class StepResult:
    sampled: dict[str, Sampled] = field(default_factory=dict)
    """The next token of every request whose chunk samples (and did not fail)."""
    prompt_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    """Prompt logprobs newly computed for echo requests."""
    failed: dict[str, str] = field(default_factory=dict)
    """Requests that failed on their own this step → why."""
    poisoned: list[str] = field(default_factory=list)
    """Of those, the ones whose logits were not finite: their cache blocks may hold NaN."""


class ModelRunner:
    def __init__(self, model: Transformer, config: SchedulerConfig) -> None:
        if not isinstance(model, Transformer):
            raise TypeError("the engine runs Transformer models (an LSTM has no KV cache)")
        self.model = model
        self.vocab_size = model.config.vocab_size
        self.device = model_device(model)
        self.block_size = config.block_size
        dtype = model.model.embed_tokens.weight.dtype  # not lm_head's: a quantized one has none
        self.cache = PagedKVCache.allocate(
            model.config, config.num_blocks, config.block_size, dtype=dtype, device=self.device
        )
        self._processors: dict[str, list[LogitsProcessor]] = {}
        self._samplers: dict[str, SequenceSampler] = {}

    def add(self, request: Request, processors: Sequence[LogitsProcessor] = ()) -> None:
        """Make REQUEST's sampler (its processors, seeded generator, penalty counts); raises
        `LmforgeError` for parameters the model cannot take (a logit_bias id out of range)."""
        self._samplers[request.request_id] = SequenceSampler(
            request.params,
            request.prompt_ids,
            self.vocab_size,
            processors=processors,
            device=self.device,
        )

    def release(self, request_id: str) -> None:
        """Forget a finished or aborted request's sampling state."""
        self._samplers.pop(request_id, None)

    @torch.inference_mode()
    def run(self, step: SchedulerOutput) -> StepResult:
        """Compute STEP's chunks; sample where they reach their request's last token."""
        result = StepResult()
        to_sample: list[tuple[Request, torch.Tensor]] = []  # (request, logits [V])
        if step.decodes:
            hidden = self._forward(step.decodes)[:, 0]  # [B, C]
            logits = self.model.logits(hidden).float()  # [B, V]
            to_sample.extend((c.request, logits[i]) for i, c in enumerate(step.decodes))
        for group in _prefill_groups(step.prefills):
            hidden = self._forward(group)  # [P, T, C]
            for i, chunk in enumerate(group):
                last, lps = self._chunk_outputs(chunk, hidden[i, : chunk.length])
                if lps:
                    result.prompt_logprobs[chunk.request.request_id] = lps
                if last is not None:
                    to_sample.append((chunk.request, last))
        self._sample(to_sample, result)
        return result

    # -- forward passes -----------------------------------------------------------------------

    def _forward(self, chunks: list[Chunk]) -> torch.Tensor:
        """Hidden states [B, T, C] of CHUNKS as one right-padded batch on the paged cache."""
        size = self.block_size
        width = max(c.length for c in chunks)
        n_blocks = max(-(-(c.start + c.length) // size) for c in chunks)
        trash = self.cache.trash_slot
        ids, positions, slots, tables = [], [], [], []
        for c in chunks:
            request, pad = c.request, width - c.length
            pos = list(range(c.start, c.start + c.length))
            table = request.block_ids[: -(-(c.start + c.length) // size)]
            ids.append(request.tokens(c.start, c.start + c.length) + [0] * pad)
            positions.append(pos + [pos[-1]] * pad)  # padding sees what the last token sees
            slots.append([table[p // size] * size + p % size for p in pos] + [trash] * pad)
            tables.append(table + [0] * (n_blocks - len(table)))  # 0: the null block

        def tensor(rows: list[list[int]]) -> torch.Tensor:
            return torch.tensor(rows, dtype=torch.long, device=self.device)

        batch = self.cache.batch(tensor(tables), tensor(slots))
        return self.model.hidden_states(tensor(ids), tensor(positions), batch)

    def _chunk_outputs(
        self, chunk: Chunk, hidden: torch.Tensor
    ) -> tuple[torch.Tensor | None, list[TokenLogprob]]:
        """From the final hidden states [T, C] of CHUNK's tokens: the logits that pick the next
        token (None unless the chunk samples) and the prompt logprobs it newly covers."""
        request = chunk.request
        samples = chunk.samples and request.params.max_tokens > 0
        last = self.model.logits(hidden[-1:])[0].float() if samples else None
        return last, self._prompt_logprobs(request, chunk.start, hidden)

    def _prompt_logprobs(
        self, request: Request, start: int, hidden: torch.Tensor
    ) -> list[TokenLogprob]:
        """Logprobs of the prompt tokens predicted by positions start.. of HIDDEN [T, C] that
        the request does not have yet (a recompute after preemption skips them)."""
        have = request.prompt_logprobs
        if have is None:
            return []
        n_prompt = len(request.prompt_ids)
        # Position i predicts token i + 1; we need tokens len(have) .. n_prompt - 1.
        first, last = max(start, len(have) - 1), min(start + hidden.shape[0], n_prompt - 1)
        if first >= last:
            return []
        logits = self.model.logits(hidden[first - start : last - start]).float()
        targets = torch.tensor(request.prompt_ids[first + 1 : last + 1], device=self.device)
        return _logprobs(logits.log_softmax(-1), targets, request.params.top_logprobs)

    # -- sampling -----------------------------------------------------------------------------

    def _sample(self, rows: list[tuple[Request, torch.Tensor]], result: StepResult) -> None:
        if not rows:
            return
        logits = torch.stack([row for _, row in rows])  # [R, V]
        finite = torch.isfinite(logits).all(-1).tolist()
        greedy = logits.argmax(-1).tolist()
        for i, (request, row) in enumerate(rows):
            rid = request.request_id
            try:
                if not finite[i]:
                    result.poisoned.append(rid)
                    raise SamplingError("the model computed non-finite logits for this request")
                sampler = self._samplers[rid]
                if sampler.plain_greedy:
                    token = greedy[i]
                else:
                    token = sampler.choose(row, request.output_ids)
                logprob = None
                if request.params.logprobs:
                    logprob = _logprobs(
                        row[None].log_softmax(-1),
                        torch.tensor([token], device=self.device),
                        request.params.top_logprobs,
                    )[0]
                result.sampled[rid] = Sampled(token, logprob)
            except Exception as e:  # this request's own failure: the others go on
                why = f"sampling failed: {type(e).__name__}: {e}"
                result.failed[rid] = str(e) if isinstance(e, SamplingError) else why

    # -- embeddings ---------------------------------------------------------------------------

    @torch.inference_mode()
    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Mean-pooled, L2-normalised final hidden states, one vector per input."""
        vectors = []
        for ids in inputs:
            batch = torch.tensor([ids], device=self.device)
            hidden = self.model.hidden_states(batch)[0].float()  # [T, C]
            vectors.append(torch.nn.functional.normalize(hidden.mean(0), dim=0).tolist())
        return vectors


def _prefill_groups(chunks: list[Chunk]) -> list[list[Chunk]]:
    """CHUNKS as batches whose right padding stays under MAX_PADDING of their tokens: longest
    first, each batch taking the next chunk while that holds."""
    groups: list[list[Chunk]] = []
    for chunk in sorted(chunks, key=lambda c: -c.length):
        group = groups[-1] if groups else None
        if group is not None:
            width = group[0].length  # the longest: sorted
            real = sum(c.length for c in group) + chunk.length
            if width * (len(group) + 1) - real <= MAX_PADDING * width * (len(group) + 1):
                group.append(chunk)
                continue
        groups.append([chunk])
    return groups


def _logprobs(log_probs: torch.Tensor, targets: torch.Tensor, top: int) -> list[TokenLogprob]:
    """TokenLogprobs of TARGETS [T] under LOG_PROBS [T, V], each with its TOP alternatives."""
    chosen = log_probs.gather(-1, targets[:, None])[:, 0].tolist()
    alternatives: list[list[tuple[int, float]]] = [[] for _ in chosen]
    if top:
        values, indices = log_probs.topk(top, dim=-1)
        alternatives = [
            list(zip(idx, val, strict=True))
            for idx, val in zip(indices.tolist(), values.tolist(), strict=True)
        ]
    return [
        TokenLogprob(int(t), lp, alt)
        for t, lp, alt in zip(targets.tolist(), chosen, alternatives, strict=True)
    ]
