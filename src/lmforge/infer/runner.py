"""`ModelRunner`: runs one scheduled step on the model and samples the next tokens.

It owns the KV cache (`max_batch` rows × `max_model_len` positions, one row per running
request) and passes it to `Transformer.forward`. A step is:

- one batched decode forward over cache rows [0, last decode slot]: each decoding request
  feeds its last sampled token at its own position (per-row positions, masked attention);
  rows in that range that do not decode get a harmless dummy token (see
  `SchedulerOutput.parked`). Running it before the prefills keeps that true.
- the first chunks of newly admitted requests as one right-padded batch (through a scratch
  cache, copied to their rows), and any other prefill chunk in a forward of its own on its row.

Then, for each chunk that reaches its request's last token, the next token is chosen: greedy
rows by one argmax over the batch, the others one by one with their penalties and their own
seeded generator. Log-probabilities are those of the model (before penalties and temperature).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.infer.request import Request, TokenLogprob
from lmforge.infer.sampling import TokenHistory, apply_penalties, make_generator, sample
from lmforge.infer.scheduler import Chunk, Sampled, SchedulerOutput
from lmforge.model.kv_cache import KVCache
from lmforge.model.transformer import Transformer


@dataclass
class _Sequence:
    """Sampling state that outlives a preemption: the draws continue, the counts stay."""

    generator: torch.Generator | None
    history: TokenHistory | None


class ModelRunner:
    def __init__(self, model: Transformer, max_batch: int, max_model_len: int) -> None:
        if not isinstance(model, Transformer):
            raise TypeError("the engine runs Transformer models (an LSTM has no KV cache)")
        self.model = model
        self.vocab_size = model.config.vocab_size
        dtype = model.model.embed_tokens.weight.dtype  # not lm_head's: a quantized one has none
        self.cache = KVCache.allocate(model.config, max_batch, max_model_len, dtype=dtype)
        self._sequences: dict[str, _Sequence] = {}

    def release(self, request_id: str) -> None:
        """Forget a finished or aborted request's sampling state."""
        self._sequences.pop(request_id, None)

    @torch.inference_mode()
    def run(
        self, step: SchedulerOutput
    ) -> tuple[dict[str, Sampled], dict[str, list[TokenLogprob]]]:
        """Compute STEP; return the sampled tokens and the echo requests' prompt logprobs."""
        to_sample: list[tuple[Request, torch.Tensor]] = []  # (request, logits [V])
        prompt_logprobs: dict[str, list[TokenLogprob]] = {}
        if step.decodes:
            logits = self._decode(step)
            to_sample.extend((c.request, logits[c.request.slot or 0]) for c in step.decodes)
        fresh = [c for c in step.prefills if c.start == 0]
        if len(fresh) < 2:
            fresh = []
        rest = [c for c in step.prefills if c not in fresh]
        results = (self._prefill_fresh(fresh) if fresh else []) + [self._prefill(c) for c in rest]
        for chunk, (last, lps) in zip(fresh + rest, results, strict=True):
            if lps:
                prompt_logprobs[chunk.request.request_id] = lps
            if last is not None:
                to_sample.append((chunk.request, last))
        return self._sample(to_sample), prompt_logprobs

    # -- forward passes -----------------------------------------------------------------------

    def _decode(self, step: SchedulerOutput) -> torch.Tensor:
        rows = max(c.request.slot or 0 for c in step.decodes) + 1
        ids = torch.zeros(rows, 1, dtype=torch.long)
        positions = torch.zeros(rows, 1, dtype=torch.long)
        for slot, position in step.parked.items():
            positions[slot, 0] = position
        for chunk in step.decodes:
            slot = chunk.request.slot or 0
            ids[slot, 0] = chunk.request.token(chunk.start)
            positions[slot, 0] = chunk.start
        cache = KVCache(self.cache.k[:, :rows], self.cache.v[:, :rows])
        return self.model(ids, positions, cache)[:, -1].float()  # [rows, V]

    def _prefill(self, chunk: Chunk) -> tuple[torch.Tensor | None, list[TokenLogprob]]:
        """Run CHUNK on its cache row; its `_chunk_outputs`."""
        request = chunk.request
        slot = request.slot or 0
        start, stop = chunk.start, chunk.start + chunk.length
        ids = torch.tensor([request.tokens(start, stop)])
        positions = torch.arange(start, stop)
        cache = KVCache(self.cache.k[:, slot : slot + 1], self.cache.v[:, slot : slot + 1])
        return self._chunk_outputs(chunk, self.model.hidden_states(ids, positions, cache)[0])

    def _prefill_fresh(
        self, chunks: list[Chunk]
    ) -> list[tuple[torch.Tensor | None, list[TokenLogprob]]]:
        """Several first chunks (start 0) as one right-padded batch: one pass over the weights
        instead of one per request. Their keys and values go to a scratch cache and are then
        copied to each request's row; padding comes after every real token, so the causal mask
        keeps it out of their attention."""
        longest = max(c.length for c in chunks)
        ids = torch.zeros(len(chunks), longest, dtype=torch.long)
        for i, c in enumerate(chunks):
            ids[i, : c.length] = torch.tensor(c.request.tokens(0, c.length))
        scratch = KVCache.allocate(
            self.model.config, len(chunks), longest, dtype=self.cache.k.dtype
        )
        hidden = self.model.hidden_states(ids, None, scratch)  # [P, T, C]
        out = []
        for i, c in enumerate(chunks):
            slot = c.request.slot or 0
            self.cache.k[:, slot, :, : c.length] = scratch.k[:, i, :, : c.length]
            self.cache.v[:, slot, :, : c.length] = scratch.v[:, i, :, : c.length]
            out.append(self._chunk_outputs(c, hidden[i, : c.length]))
        return out

    def _chunk_outputs(
        self, chunk: Chunk, hidden: torch.Tensor
    ) -> tuple[torch.Tensor | None, list[TokenLogprob]]:
        """From the final hidden states [T, C] of CHUNK's tokens: the logits that pick the next
        token (None unless the chunk samples) and the prompt logprobs it newly covers."""
        request = chunk.request
        samples = chunk.samples and request.params.max_tokens > 0
        last = self.model.lm_head(hidden[-1:])[0].float() if samples else None
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
        logits = self.model.lm_head(hidden[first - start : last - start]).float()
        targets = torch.tensor(request.prompt_ids[first + 1 : last + 1])
        return _logprobs(logits.log_softmax(-1), targets, request.params.top_logprobs)

    # -- sampling -----------------------------------------------------------------------------

    def _sample(self, rows: list[tuple[Request, torch.Tensor]]) -> dict[str, Sampled]:
        if not rows:
            return {}
        logits = torch.stack([row for _, row in rows])  # [R, V]
        greedy = logits.argmax(-1).tolist()
        out = {}
        for i, (request, row) in enumerate(rows):
            params = request.params
            seq = self._sequences.get(request.request_id)
            if seq is None:
                history = None
                if params.penalized:
                    history = TokenHistory([request.prompt_ids], self.vocab_size)
                    for tid in request.output_ids:  # none unless recomputed after a restart
                        history.add(torch.tensor([tid]))
                seq = _Sequence(make_generator(params), history)
                self._sequences[request.request_id] = seq
            if params.greedy and seq.history is None:
                token = greedy[i]
            else:
                chosen = row[None]
                if seq.history is not None:
                    chosen = apply_penalties(
                        chosen, seq.history.output_counts, seq.history.seen, params
                    )
                token = int(sample(chosen, params, seq.generator)[0])
            if seq.history is not None:
                seq.history.add(torch.tensor([token]))
            logprob = None
            if params.logprobs:
                logprob = _logprobs(
                    row[None].log_softmax(-1), torch.tensor([token]), params.top_logprobs
                )[0]
            out[request.request_id] = Sampled(token, logprob)
        return out

    # -- embeddings ---------------------------------------------------------------------------

    @torch.inference_mode()
    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Mean-pooled, L2-normalised final hidden states, one vector per input."""
        vectors = []
        for ids in inputs:
            hidden = self.model.hidden_states(torch.tensor([ids]))[0].float()  # [T, C]
            vectors.append(torch.nn.functional.normalize(hidden.mean(0), dim=0).tolist())
        return vectors


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
