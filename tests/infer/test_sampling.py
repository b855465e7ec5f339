"""`SamplingParams` validation, and `filter_logits`/`sample` against slow obvious references."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.infer.sampling import (
    SamplingParams,
    TokenHistory,
    apply_penalties,
    filter_logits,
    make_generator,
    sample,
)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", -1),
        ("max_tokens", 2.5),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", -1.0),
        ("temperature", "1"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("top_p", None),
        ("top_k", -1),
        ("top_k", 1.5),
        ("min_p", 1.0),
        ("min_p", -0.1),
        ("min_p", math.nan),
        ("stop", [""]),
        ("stop", ["ok", 3]),
        ("stop", "END"),  # a bare str would be one stop string per character
        ("seed", -(2**63) - 1),
        ("seed", 2**64),
        ("seed", 1.5),
        ("presence_penalty", 2.5),
        ("presence_penalty", math.nan),
        ("frequency_penalty", -3),
        ("frequency_penalty", "1"),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", math.inf),
        ("n", 0),
        ("n", True),
        ("logprobs", 1),
        ("top_logprobs", 21),
        ("top_logprobs", -1),
    ],
)
def test_bad_value_is_an_error_naming_the_field(field, value):  # type: ignore[no-untyped-def]
    with pytest.raises(LmforgeError) as info:
        SamplingParams(**{field: value})
    assert str(info.value).startswith(field)


def test_good_values_are_accepted():  # type: ignore[no-untyped-def]
    p = SamplingParams(
        max_tokens=0, temperature=2.0, top_k=5, top_p=1.0, min_p=0.5, seed=0, stop=["x"]
    )
    assert not p.greedy
    assert SamplingParams().greedy
    assert make_generator(SamplingParams()) is None


def random_logits(rows: int = 4, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def kept(filtered: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in filtered]


def test_greedy_is_argmax():  # type: ignore[no-untyped-def]
    logits = random_logits()
    ids = sample(logits, SamplingParams(temperature=0.0))
    want = [max(range(len(row)), key=lambda j, row=row: row[j]) for row in logits.tolist()]
    assert ids.tolist() == want


def test_temperature_scales_logits():  # type: ignore[no-untyped-def]
    logits = random_logits()
    out = filter_logits(logits, SamplingParams(temperature=0.5))
    # shifted so that the best logit is 0: the same distribution, no overflow at tiny T
    torch.testing.assert_close(out, (logits - logits.max(-1, keepdim=True).values) * 2)


@pytest.mark.parametrize("k", [1, 3, 49, 50, 80])
def test_top_k_keeps_exactly_the_k_largest(k):  # type: ignore[no-untyped-def]
    logits = random_logits()
    out = filter_logits(logits, SamplingParams(temperature=1.0, top_k=k))
    for row, keep, got in zip(logits.tolist(), kept(out), out, strict=True):
        order = sorted(range(len(row)), key=lambda j, row=row: -row[j])
        assert keep == set(order[:k])
        top = max(row)
        assert got[sorted(keep)].tolist() == pytest.approx([row[j] - top for j in sorted(keep)])


def softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


def reference_top_p(row: list[float], p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability mass reaches p."""
    probs = softmax(row)
    order = sorted(range(len(row)), key=lambda j: -probs[j])
    mass, keep = 0.0, set()
    for j in order:
        keep.add(j)
        mass += probs[j]
        if mass >= p:
            break
    return keep


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("p", [0.01, 0.3, 0.5, 0.9, 0.99])
def test_top_p_matches_reference(p, temperature):  # type: ignore[no-untyped-def]
    logits = random_logits(rows=8, seed=1)
    out = filter_logits(logits, SamplingParams(temperature=temperature, top_p=p))
    for row, keep in zip((logits / temperature).tolist(), kept(out), strict=True):
        assert keep == reference_top_p(row, p)


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 0.9])
def test_min_p_matches_reference(min_p):  # type: ignore[no-untyped-def]
    logits = random_logits(rows=8, seed=2)
    out = filter_logits(logits, SamplingParams(temperature=1.0, min_p=min_p))
    for row, keep in zip(logits.tolist(), kept(out), strict=True):
        probs = softmax(row)
        assert keep == {j for j, q in enumerate(probs) if q >= min_p * max(probs)}


def draws(params: SamplingParams, n: int = 50) -> list[int]:
    logits = torch.zeros(1, 20)  # uniform: every draw is up to the generator
    gen = make_generator(params)
    return [int(sample(logits, params, gen)) for _ in range(n)]


def test_seeded_sampling_is_reproducible():  # type: ignore[no-untyped-def]
    a = draws(SamplingParams(temperature=1.0, seed=123))
    assert a == draws(SamplingParams(temperature=1.0, seed=123))
    assert a != draws(SamplingParams(temperature=1.0, seed=124))
    assert len(set(a)) > 1


@pytest.mark.parametrize(
    ("top_k", "want"),
    [(0, [0.1, 0.2, 0.3, 0.4]), (2, [0.0, 0.0, 3 / 7, 4 / 7])],
)
def test_sampled_frequencies_match_probabilities(top_k, want):  # type: ignore[no-untyped-def]
    n = 20_000
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().expand(n, 4)
    params = SamplingParams(temperature=1.0, top_k=top_k, seed=7)
    ids = sample(logits, params, make_generator(params))
    freq = torch.bincount(ids, minlength=4).double() / n
    assert freq.tolist() == pytest.approx(want, abs=0.02)


def naive_penalties(logits, prompt, output, params):  # type: ignore[no-untyped-def]
    """One row, token by token, as OpenAI's and CTRL's papers describe it."""
    out = [float(x) for x in logits]
    for token in set(prompt) | set(output):
        if params.repetition_penalty != 1.0:
            x = out[token]
            out[token] = x / params.repetition_penalty if x > 0 else x * params.repetition_penalty
    for token in set(output):
        count = output.count(token)
        out[token] -= params.frequency_penalty * count + params.presence_penalty
    return torch.tensor(out)


@pytest.mark.parametrize(
    ("presence", "frequency", "repetition"),
    [(0.5, 0.0, 1.0), (0.0, 0.7, 1.0), (0.0, 0.0, 1.3), (-0.4, 1.1, 0.8), (2.0, -2.0, 1.5)],
)
def test_penalties_match_reference(presence, frequency, repetition):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    vocab = 50
    params = SamplingParams(
        presence_penalty=presence, frequency_penalty=frequency, repetition_penalty=repetition
    )
    prompts = [[1, 2, 3, 3], [], [7]]
    outputs = [[3, 4, 4, 4, 9], [0, 0], []]
    logits = torch.randn(3, vocab, generator=g) * 3
    history = TokenHistory(prompts, vocab)
    padded = [out + [49] * (5 - len(out)) for out in outputs]  # short rows go on with 49
    for step in range(5):
        history.add(torch.tensor([out[step] for out in padded]))
    got = apply_penalties(logits, history.output_counts, history.seen, params)
    for row in range(3):
        want = naive_penalties(logits[row], prompts[row], padded[row], params)
        torch.testing.assert_close(got[row], want)


def test_penalties_change_greedy_generation_like_a_naive_loop(tiny_model):  # type: ignore[no-untyped-def]
    """generate_ids with penalties == argmax over the full recompute with naive penalties."""
    from lmforge.infer.generate import generate_ids

    params = SamplingParams(
        max_tokens=20, repetition_penalty=1.8, presence_penalty=0.6, frequency_penalty=0.4
    )
    prompt = [5, 9, 5, 9, 5]
    got = [step.token_id for step in generate_ids(tiny_model, prompt, params)]
    ids, want = list(prompt), []
    with torch.no_grad():
        for _ in range(20):
            logits = tiny_model(torch.tensor([ids]))[0, -1]
            token = int(naive_penalties(logits, prompt, want, params).argmax())
            want.append(token)
            ids.append(token)
    assert got == want
    plain = [s.token_id for s in generate_ids(tiny_model, prompt, SamplingParams(max_tokens=20))]
    assert plain != got  # the penalties did something on this model
