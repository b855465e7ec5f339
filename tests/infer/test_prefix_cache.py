"""Automatic prefix caching in the engine: the same tokens with it and without it, blocks reused,
evicted and never leaked."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import tiny_config
from lmforge.infer.engine import Engine
from lmforge.infer.params import SamplingParams
from lmforge.infer.request import Request
from lmforge.infer.scheduler import SchedulerConfig
from lmforge.model.transformer import Transformer


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config("llama", max_seq_len=2048)).eval()


def workload(n: int, vocab: int, seed: int) -> list[tuple[list[int], SamplingParams]]:
    """N requests drawn from a few shared system prompts, some repeated verbatim, some
    extending others' whole conversations, with random tails and lengths."""
    rng = random.Random(seed)
    systems = [[rng.randrange(vocab) for _ in range(rng.randint(10, 70))] for _ in range(4)]
    out: list[tuple[list[int], SamplingParams]] = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.15 and out:
            prompt = list(rng.choice(out)[0])  # the very same prompt again
        elif kind < 0.3 and out:
            prompt = rng.choice(out)[0] + [rng.randrange(vocab) for _ in range(rng.randint(1, 9))]
        else:
            tail = [rng.randrange(vocab) for _ in range(rng.randint(1, 25))]
            prompt = rng.choice(systems) + tail
        params = SamplingParams(max_tokens=rng.randint(1, 12))
        if rng.random() < 0.1:
            params = SamplingParams(max_tokens=rng.randint(0, 3), echo=True, logprobs=True)
        out.append((prompt[:200], params))
    return out


def run(model: Transformer, config: SchedulerConfig, jobs, arrivals: int) -> list[Request]:  # type: ignore[no-untyped-def]
    """JOBS arriving a few at a time (ARRIVALS per step) until all are done."""
    engine = Engine(model, config)
    requests: list[Request] = []
    pending = list(jobs)
    while pending or engine.has_work:
        for prompt, params in pending[:arrivals]:
            requests.append(engine.add_request(prompt, params))
        pending = pending[arrivals:]
        engine.step()
    pool = engine.scheduler.blocks
    assert pool.num_used == 0, "blocks leaked"  # the pool returns to where it started
    pool.check()
    return requests


@pytest.mark.parametrize("block_size", [4, 16])
def test_greedy_outputs_are_the_same_with_and_without_prefix_caching(
    model: Transformer, block_size: int
) -> None:
    jobs = workload(200, model.config.vocab_size, seed=block_size)
    # a pool much smaller than the workload: cached blocks are evicted and requests preempted
    common = dict(
        max_batch=8, max_model_len=256, max_batched_tokens=96, block_size=block_size,
        cache_tokens=768, max_queue=256,
    )  # fmt: skip
    cached = run(model, SchedulerConfig(**common, prefix_caching=True), jobs, arrivals=3)
    plain = run(model, SchedulerConfig(**common, prefix_caching=False), jobs, arrivals=3)
    for a, b in zip(cached, plain, strict=True):
        assert a.output_ids == b.output_ids
        assert a.status is b.status
        if a.params.echo:  # prompt logprobs stay exact: echo requests compute everything
            assert a.num_cached_tokens == 0
            got = [lp.logprob for lp in a.prompt_logprobs or [] if lp is not None]
            want = [lp.logprob for lp in b.prompt_logprobs or [] if lp is not None]
            assert got == pytest.approx(want, abs=1e-5)
    hits = sum(r.num_cached_tokens for r in cached)
    assert hits > 0.3 * sum(len(r.prompt_ids) for r in cached)
    assert all(r.num_cached_tokens == 0 for r in plain)


def test_a_repeated_1500_token_system_prompt_is_served_from_the_cache(model: Transformer) -> None:
    rng = random.Random(7)
    vocab = model.config.vocab_size
    system = [rng.randrange(vocab) for _ in range(1500)]
    engine = Engine(model, SchedulerConfig(max_batch=4, max_model_len=2048))
    params = SamplingParams(max_tokens=5)
    (first,) = engine.generate([[*system, 1, 2, 3]], params)
    steps_before = engine.stats.steps
    (second,) = engine.generate([[*system, 4, 5, 6, 7]], params)
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens >= 1400  # 1488: every whole block of the system prompt
    assert second.num_cached_tokens == 1500 // 16 * 16
    # one prefill step instead of three 512-token chunks, then the decodes
    assert engine.stats.steps - steps_before == 1 + 4
    solo = Engine(model, SchedulerConfig(max_batch=4, max_model_len=2048, prefix_caching=False))
    (alone,) = solo.generate([[*system, 4, 5, 6, 7]], params)
    assert second.output_ids == alone.output_ids
    metrics = engine.metrics()
    assert metrics.prefix_cache_hits == second.num_cached_tokens
    assert metrics.prefix_cache_queries == 1503 + 1504
    assert metrics.kv_cache_blocks_used == 0


def test_n_choices_prefill_their_prompt_once(model: Transformer) -> None:
    rng = random.Random(8)
    prompt = [rng.randrange(model.config.vocab_size) for _ in range(300)]
    engine = Engine(model, SchedulerConfig(max_batch=8, max_model_len=512))
    params = [SamplingParams(max_tokens=4, temperature=1.0, seed=i) for i in range(4)]
    requests = engine.generate([prompt] * 4, params)
    # the first computes 300 prompt tokens; the others only what follows the cached blocks
    assert engine.stats.prompt_tokens == 300 + 3 * (300 - 300 // 16 * 16)
    assert [r.num_cached_tokens for r in requests] == [0, 288, 288, 288]
    solo = Engine(model, SchedulerConfig(max_batch=8, max_model_len=512, prefix_caching=False))
    for request, p in zip(requests, params, strict=True):
        (alone,) = solo.generate([prompt], p)
        assert request.output_ids == alone.output_ids
