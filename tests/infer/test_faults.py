"""One request's failure stays in that request: faults injected into the engine.

A logits processor that raises (or returns NaN) stands for any failure inside one request's
sampling; a model whose forward raises once stands for a failure of the shared pass. The other
requests must produce exactly the tokens they produce alone, and the engine must go on.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_config
from lmforge.errors import LmforgeError
from lmforge.infer.engine import Engine
from lmforge.infer.generate import generate_ids
from lmforge.infer.params import SamplingParams
from lmforge.infer.request import Request, RequestStatus
from lmforge.infer.scheduler import SchedulerConfig
from lmforge.model.transformer import Transformer


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config("llama", max_seq_len=256)).eval()


class Boom:
    """A processor that raises on its request's AT-th token."""

    def __init__(self, at: int = 0) -> None:
        self.at = at

    def __call__(
        self, prompt_ids: Sequence[int], output_ids: Sequence[int], logits: torch.Tensor
    ) -> torch.Tensor:
        if len(output_ids) >= self.at:
            raise RuntimeError("injected failure")
        return logits


def nan_processor(
    prompt_ids: Sequence[int], output_ids: Sequence[int], logits: torch.Tensor
) -> torch.Tensor:
    return torch.full_like(logits, math.nan)


def solo(model: Transformer, prompt: list[int], params: SamplingParams) -> list[int]:
    return [s.token_id for s in generate_ids(model, prompt, params)]


def prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(2, 40))] for _ in range(n)]


def mixed_params(i: int) -> SamplingParams:
    if i % 3 == 0:
        return SamplingParams(max_tokens=12)
    if i % 3 == 1:
        return SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=i)
    return SamplingParams(max_tokens=12, repetition_penalty=1.3, presence_penalty=0.5, seed=i)


def test_a_failure_in_one_requests_sampling_stays_in_that_request(model: Transformer) -> None:
    engine = Engine(model, SchedulerConfig(max_batch=8, max_model_len=128))
    ps = prompts(8, model.config.vocab_size, seed=1)
    requests = [
        engine.add_request(p, mixed_params(i), processors=[Boom(at=3)] if i == 5 else [])
        for i, p in enumerate(ps)
    ]
    outputs = []
    while engine.has_work:
        outputs += engine.step()
    failed = requests[5]
    assert failed.status is RequestStatus.FINISHED_ERROR and len(failed.output_ids) == 3
    assert failed.error is not None and "injected failure" in failed.error
    (last,) = [o for o in outputs if o.request_id == failed.request_id and o.finished]
    assert last.finish_reason == "error" and last.error == failed.error
    for i, request in enumerate(requests):
        if i != 5:
            assert request.status is RequestStatus.FINISHED_LENGTH
            assert request.output_ids == solo(model, ps[i], mixed_params(i))
    assert engine.stats.failed_requests == 1
    assert engine.scheduler.blocks.num_used == 0
    (after,) = engine.generate([ps[0]], mixed_params(0))  # the engine goes on
    assert after.output_ids == solo(model, ps[0], mixed_params(0))


def test_non_finite_logits_fail_their_request_and_leave_no_trace(model: Transformer) -> None:
    engine = Engine(model, SchedulerConfig(max_batch=4, max_model_len=128, block_size=4))
    ps = prompts(3, model.config.vocab_size, seed=2)
    bad = engine.add_request(ps[0], SamplingParams(max_tokens=5), processors=[nan_processor])
    good = [engine.add_request(p, SamplingParams(max_tokens=5)) for p in ps[1:]]
    while engine.has_work:
        engine.step()
    assert bad.status is RequestStatus.FINISHED_ERROR and "NaN" in (bad.error or "")
    for request, p in zip(good, ps[1:], strict=True):
        assert request.output_ids == solo(model, p, SamplingParams(max_tokens=5))


def test_a_nan_from_the_model_is_quarantined(model: Transformer) -> None:
    # The model itself yields NaN for one request (here: an embedding row set to NaN). Its
    # blocks must not poison the next requests that get them (masked reads of NaN are NaN).
    poisoned = Transformer(tiny_config("llama", max_seq_len=256)).eval()
    poisoned.load_state_dict(model.state_dict())
    bad_token = 17
    with torch.no_grad():
        poisoned.model.embed_tokens.weight[bad_token] = math.nan
    config = SchedulerConfig(max_batch=2, max_model_len=64, block_size=4, cache_tokens=64)
    engine = Engine(poisoned, config)
    (bad,) = engine.generate([[1, 2, bad_token, 4, 5, 6]], SamplingParams(max_tokens=3))
    assert bad.status is RequestStatus.FINISHED_ERROR and "non-finite" in (bad.error or "")
    assert engine.stats.failed_requests == 1
    assert (
        torch.isfinite(engine.runner.cache.k).all() and torch.isfinite(engine.runner.cache.v).all()
    )
    ps = [p for p in prompts(6, model.config.vocab_size, seed=3) if bad_token not in p]
    later = engine.generate(ps, SamplingParams(max_tokens=6))
    for request, p in zip(later, ps, strict=True):
        assert request.output_ids == solo(model, p, SamplingParams(max_tokens=6))


def test_a_failed_forward_fails_its_step_and_the_engine_recovers(
    model: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(model, SchedulerConfig(max_batch=4, max_model_len=128))
    ps = prompts(3, model.config.vocab_size, seed=4)
    first = [engine.add_request(p, SamplingParams(max_tokens=6)) for p in ps[:2]]
    engine.step()  # both prefilled
    real = model.hidden_states
    calls = 0

    def flaky(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected forward failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "hidden_states", flaky)
    outputs = engine.step()
    assert {o.request_id for o in outputs} == {r.request_id for r in first}
    assert all(
        o.finish_reason == "error" and "forward pass failed" in (o.error or "") for o in outputs
    )
    assert engine.stats.failed_steps == 1 and not engine.has_work
    assert engine.scheduler.blocks.num_used == 0
    (after,) = engine.generate([ps[2]], SamplingParams(max_tokens=6))
    assert after.output_ids == solo(model, ps[2], SamplingParams(max_tokens=6))


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 10),
    fail_rate=st.floats(0.0, 0.6),
    caching=st.booleans(),
)
def test_random_workloads_with_random_failures_keep_the_invariants(
    model: Transformer, seed: int, n: int, fail_rate: float, caching: bool
) -> None:
    rng = random.Random(seed)
    config = SchedulerConfig(
        max_batch=4, max_model_len=96, max_batched_tokens=24, block_size=4,
        cache_tokens=160, prefix_caching=caching,
    )  # fmt: skip
    engine = Engine(model, config)
    shared = [rng.randrange(model.config.vocab_size) for _ in range(rng.randint(0, 20))]
    jobs: list[tuple[list[int], SamplingParams, bool]] = []
    requests: list[Request] = []
    for i, p in enumerate(prompts(n, model.config.vocab_size, seed)):
        fails = rng.random() < fail_rate
        jobs.append((shared + p, mixed_params(i), fails))
    pending = list(jobs)
    while pending or engine.has_work:
        if pending and rng.random() < 0.6:
            prompt, params, fails = pending.pop(0)
            boom = [Boom(at=rng.randint(0, 5))] if fails else []
            requests.append(engine.add_request(prompt, params, processors=boom))
        if engine.has_work:
            engine.step()
    assert engine.scheduler.blocks.num_used == 0
    engine.scheduler.blocks.check()
    assert engine.stats.failed_requests == sum(fails for *_, fails in jobs)
    for request, (prompt, params, fails) in zip(requests, jobs, strict=True):
        if fails:
            assert request.status is RequestStatus.FINISHED_ERROR
        else:
            assert request.output_ids == solo(model, prompt, params)


# -- extreme but valid parameters -----------------------------------------------------------------

EXTREMES = [
    SamplingParams(max_tokens=6, temperature=5e-324, seed=1),
    SamplingParams(max_tokens=6, temperature=1e-300, top_p=1e-300, seed=2),
    SamplingParams(max_tokens=6, temperature=2.0, top_p=1.0, min_p=0.999999, seed=3),
    SamplingParams(max_tokens=6, temperature=1.0, top_k=1, seed=-(2**63)),
    SamplingParams(max_tokens=6, temperature=1.0, seed=2**64 - 1),
    SamplingParams(max_tokens=6, repetition_penalty=5e-324),
    SamplingParams(max_tokens=6, repetition_penalty=10.0, temperature=1.5, seed=4),
    SamplingParams(max_tokens=6, presence_penalty=2.0, frequency_penalty=2.0),
    SamplingParams(
        max_tokens=6, presence_penalty=-2.0, frequency_penalty=-2.0, temperature=0.7, seed=5
    ),
    SamplingParams(max_tokens=6, logit_bias={0: 100.0, 5: -100.0}),
    SamplingParams(max_tokens=6, logit_bias=dict.fromkeys(range(383), -100.0), temperature=1.0),
    SamplingParams(max_tokens=6, logit_bias={1: 100, 2: 100, 3: 100}, temperature=5e-324),
]


@pytest.mark.parametrize("params", EXTREMES, ids=lambda p: str(p)[15:80])
def test_extreme_but_valid_parameters_just_work(model: Transformer, params: SamplingParams) -> None:
    prompt = prompts(1, model.config.vocab_size, seed=5)[0]
    engine = Engine(model, SchedulerConfig(max_batch=2, max_model_len=128))
    (request,) = engine.generate([prompt], params)
    assert request.status is RequestStatus.FINISHED_LENGTH, request.error
    assert len(request.output_ids) == 6
    assert all(0 <= t < model.config.vocab_size for t in request.output_ids)
    assert request.output_ids == solo(model, prompt, params)


def test_a_tiny_temperature_is_greedy(model: Transformer) -> None:
    prompt = prompts(1, model.config.vocab_size, seed=6)[0]
    greedy = solo(model, prompt, SamplingParams(max_tokens=8))
    for t in (5e-324, 1e-300, 1e-30):
        assert solo(model, prompt, SamplingParams(max_tokens=8, temperature=t, seed=9)) == greedy


# -- logit_bias ------------------------------------------------------------------------------------


def test_logit_bias_plus_100_forces_and_minus_100_bans(model: Transformer) -> None:
    prompt = prompts(1, model.config.vocab_size, seed=7)[0]
    engine = Engine(model, SchedulerConfig(max_batch=4, max_model_len=128))
    free = solo(model, prompt, SamplingParams(max_tokens=10))
    forced, banned, sampled = engine.generate(
        [prompt] * 3,
        [
            SamplingParams(max_tokens=10, logit_bias={42: 100}),
            SamplingParams(max_tokens=10, logit_bias=dict.fromkeys(set(free), -100)),
            SamplingParams(max_tokens=10, temperature=1.5, seed=3, logit_bias={42: -100}),
        ],
    )
    assert forced.output_ids == [42] * 10
    assert not set(banned.output_ids) & set(free)
    assert 42 not in sampled.output_ids


def test_logit_bias_adds_to_the_logit(model: Transformer) -> None:
    prompt = prompts(1, model.config.vocab_size, seed=8)[0]
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]))[0, -1].float()
    top2 = logits.topk(2)
    best, second = top2.indices.tolist()
    gap = float(top2.values[0] - top2.values[1])

    def first_token(bias: float) -> int:
        params = SamplingParams(max_tokens=1, logit_bias={second: bias})
        return solo(model, prompt, params)[0]

    assert first_token(gap + 1e-3) == second  # just over the gap: the runner-up wins
    assert first_token(gap - 1e-3) == best  # just under: it does not


def test_logit_bias_is_checked_against_the_vocabulary(model: Transformer) -> None:
    engine = Engine(model, SchedulerConfig(max_batch=2, max_model_len=128))
    vocab = model.config.vocab_size
    with pytest.raises(LmforgeError, match=f"token id {vocab} is outside the vocabulary"):
        engine.add_request([1, 2], SamplingParams(logit_bias={vocab: 5.0}))
    assert not engine.has_work and not engine.requests
    with pytest.raises(LmforgeError, match="logit_bias"):
        SamplingParams(logit_bias={3: 100.5})
    with pytest.raises(LmforgeError, match="logit_bias"):
        SamplingParams(logit_bias={-1: 1.0})
    with pytest.raises(LmforgeError, match="logit_bias"):
        SamplingParams(logit_bias={3: math.nan})
