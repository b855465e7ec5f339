"""The engine against the single-sequence reference: batched == one at a time, token for token."""

from __future__ import annotations

import random

import pytest
import torch

from lmforge.infer.engine import Engine
from lmforge.infer.generate import generate_ids
from lmforge.infer.params import SamplingParams
from lmforge.infer.request import RequestStatus
from lmforge.infer.scheduler import SchedulerConfig
from lmforge.model.transformer import Transformer


def _single(model: Transformer, prompt: list[int], params: SamplingParams) -> list[int]:
    return [step.token_id for step in generate_ids(model, prompt, params)]


def _prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, 30))] for _ in range(n)]


@pytest.mark.parametrize(
    "config",
    [
        SchedulerConfig(max_batch=8, max_model_len=64, max_batched_tokens=512),
        # chunked prefill: long prompts take several steps while others decode
        SchedulerConfig(max_batch=4, max_model_len=64, max_batched_tokens=7),
    ],
    ids=["whole-prefill", "chunked-prefill"],
)
def test_batched_greedy_equals_single_sequence(tiny_model: Transformer, config) -> None:
    prompts = _prompts(10, tiny_model.config.vocab_size)
    params = [SamplingParams(max_tokens=random.Random(i).randint(1, 25)) for i in range(10)]
    engine = Engine(tiny_model, config)
    requests = engine.generate(prompts, params)
    for request, prompt, p in zip(requests, prompts, params, strict=True):
        assert request.output_ids == _single(tiny_model, prompt, p)
        assert request.status is RequestStatus.FINISHED_LENGTH
    assert engine.stats.preemptions == 0
    assert not engine.requests and engine.scheduler.cache_used == 0


def test_requests_arriving_mid_batch_get_the_same_tokens(tiny_model: Transformer) -> None:
    engine = Engine(tiny_model, SchedulerConfig(max_batch=4, max_model_len=64))
    prompts = _prompts(9, tiny_model.config.vocab_size, seed=1)
    params = SamplingParams(max_tokens=12)
    requests = []
    for i, prompt in enumerate(prompts):
        requests.append(engine.add_request(prompt, params))
        for _ in range(i % 3):  # one to two steps between arrivals, some with a full batch
            engine.step()
    while engine.has_work:
        engine.step()
    for request, prompt in zip(requests, prompts, strict=True):
        assert request.output_ids == _single(tiny_model, prompt, params)


def test_preemption_by_a_tiny_cache_keeps_the_tokens(tiny_model: Transformer) -> None:
    # 64 cache tokens for 6 requests of up to 30 + 30 tokens: they must take turns.
    config = SchedulerConfig(max_batch=6, max_model_len=64, cache_tokens=64)
    engine = Engine(tiny_model, config)
    prompts = _prompts(6, tiny_model.config.vocab_size, seed=2)
    params = SamplingParams(max_tokens=30)
    requests = engine.generate(prompts, params)
    assert engine.stats.preemptions > 0
    assert sum(r.num_preemptions for r in requests) == engine.stats.preemptions
    for request, prompt in zip(requests, prompts, strict=True):
        assert request.output_ids == _single(tiny_model, prompt, params)


def test_seeded_sampling_and_penalties_match_single_sequence(tiny_model: Transformer) -> None:
    prompts = _prompts(5, tiny_model.config.vocab_size, seed=3)
    params = [
        SamplingParams(max_tokens=15, temperature=0.9, top_k=50, top_p=0.9, seed=i)
        if i % 2
        else SamplingParams(max_tokens=15, repetition_penalty=1.5, presence_penalty=1.0, seed=i)
        for i in range(5)
    ]
    requests = Engine(tiny_model, SchedulerConfig(max_model_len=64)).generate(prompts, params)
    for request, prompt, p in zip(requests, prompts, params, strict=True):
        assert request.output_ids == _single(tiny_model, prompt, p)


def test_stop_token_and_context_end(tiny_model: Transformer) -> None:
    prompt = _prompts(1, tiny_model.config.vocab_size, seed=4)[0]
    free_run = _single(tiny_model, prompt, SamplingParams(max_tokens=20))
    stop_at = free_run[5]
    params = SamplingParams(max_tokens=20, stop_token_ids=[stop_at])
    engine = Engine(tiny_model, SchedulerConfig(max_model_len=64))
    (stopped,) = engine.generate([prompt], params)
    assert stopped.output_ids == free_run[: free_run.index(stop_at) + 1]
    assert stopped.status is RequestStatus.FINISHED_STOPPED
    (long,) = engine.generate([prompt], SamplingParams(max_tokens=1000))
    assert len(prompt) + len(long.output_ids) == 64
    assert long.output_ids == _single(tiny_model, prompt, SamplingParams(max_tokens=1000))


def test_logprobs_and_echo_equal_a_full_forward(tiny_model: Transformer) -> None:
    prompt = _prompts(1, tiny_model.config.vocab_size, seed=5)[0] + [7, 8, 9]
    engine = Engine(tiny_model, SchedulerConfig(max_model_len=64, max_batched_tokens=256))
    params = SamplingParams(max_tokens=6, logprobs=True, top_logprobs=3, echo=True)
    (request,) = engine.generate([prompt], params)
    ids = prompt + request.output_ids
    with torch.inference_mode():
        ref = tiny_model(torch.tensor([ids]))[0].float().log_softmax(-1)  # [T, V]
    assert request.prompt_logprobs is not None and request.prompt_logprobs[0] is None
    got = [lp.logprob for lp in request.prompt_logprobs[1:] if lp is not None]
    want = [ref[i - 1, ids[i]].item() for i in range(1, len(prompt))]
    assert got == pytest.approx(want, abs=1e-4)
    n = len(prompt)
    outs = [lp.logprob for lp in request.logprobs]
    assert outs == pytest.approx(
        [ref[n - 1 + i, t].item() for i, t in enumerate(ids[n:])], abs=1e-4
    )
    top = request.logprobs[0].top
    assert [t for t, _ in top] == ref[n - 1].topk(3).indices.tolist()


def test_echo_with_max_tokens_zero_scores_the_prompt_only(tiny_model: Transformer) -> None:
    prompt = _prompts(1, tiny_model.config.vocab_size, seed=6)[0] + [1, 2]
    # a tiny step budget: the prompt logprobs are gathered across prefill chunks
    engine = Engine(
        tiny_model, SchedulerConfig(max_batch=2, max_model_len=64, max_batched_tokens=4)
    )
    (request,) = engine.generate([prompt], SamplingParams(max_tokens=0, echo=True))
    assert request.output_ids == []
    assert request.status is RequestStatus.FINISHED_LENGTH
    assert request.prompt_logprobs is not None and len(request.prompt_logprobs) == len(prompt)
    with torch.inference_mode():
        ref = tiny_model(torch.tensor([prompt]))[0].float().log_softmax(-1)
    want = [ref[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    assert [lp.logprob for lp in request.prompt_logprobs[1:] if lp] == pytest.approx(want, abs=1e-4)


def test_abort_frees_the_blocks_and_the_cache(tiny_model: Transformer) -> None:
    engine = Engine(tiny_model, SchedulerConfig(max_batch=2, max_model_len=64))
    a = engine.add_request([1, 2, 3], SamplingParams(max_tokens=50))
    b = engine.add_request([4, 5, 6], SamplingParams(max_tokens=5))
    engine.step()
    engine.step()
    out = engine.abort(a.request_id)
    assert out is not None and out.finish_reason == "abort"
    assert a.status is RequestStatus.FINISHED_ABORTED and a.block_ids == []
    generated = len(a.output_ids)
    while engine.has_work:
        engine.step()
    assert len(a.output_ids) == generated  # nothing more after the abort
    assert b.output_ids == _single(tiny_model, [4, 5, 6], SamplingParams(max_tokens=5))
    assert engine.scheduler.cache_used == 0 and engine.scheduler.blocks.num_used == 0
    assert engine.abort("no-such-request") is None


def test_prompt_logprobs_of_requests_prefilled_together(tiny_model: Transformer) -> None:
    # Admitted in one step, their first chunks run as one padded batch.
    prompts = [[*p, 1, 2] for p in _prompts(4, tiny_model.config.vocab_size, seed=7)]
    engine = Engine(tiny_model, SchedulerConfig(max_batch=4, max_model_len=64))
    requests = engine.generate(prompts, SamplingParams(max_tokens=0, echo=True))
    for request, prompt in zip(requests, prompts, strict=True):
        with torch.inference_mode():
            ref = tiny_model(torch.tensor([prompt]))[0].float().log_softmax(-1)
        want = [ref[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
        assert request.prompt_logprobs is not None
        got = [lp.logprob for lp in request.prompt_logprobs[1:] if lp is not None]
        assert got == pytest.approx(want, abs=1e-4)
