"""Dedup: exact keys, the vectorized MinHash against datasketch, and the near-duplicate index
against planted pairs of known shingle Jaccard."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from datasketch import LeanMinHash, MinHash, MinHashLSH

from lmforge.data import dedup
from lmforge.data.dedup import (
    ExactIndex,
    MinHashParams,
    NearDuplicateIndex,
    estimate_jaccard,
    exact_key,
    minhash_signature,
    shingle_hash,
    shingles,
)
from lmforge.errors import LmforgeError

PARAMS = MinHashParams()

TRICKY = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!",
    "Hello, WORLD -- hello world; café_1 naïve 0123 Straße ﬁx \ud800 end",
    "你好，世界。今天天气很好，我们去公园散步吧。Python是一种编程语言。",
    "日本語のテキストです。カタカナとひらがな、漢字を含みます。",
    "한국어 텍스트는 띄어쓰기를 합니다 mixed with English words",
    "too short",  # fewer words than ngram: one shingle of all of them
    "a b c d e",  # exactly ngram words
    "",
    "!!! ??? ...",  # no words at all
]


def _datasketch_loop(text: str, params: MinHashParams) -> np.ndarray:
    m = MinHash(
        num_perm=params.num_perm, seed=params.seed, hashfunc=shingle_hash, scheme="affine64"
    )
    for shingle in shingles(text, params.ngram):
        m.update(shingle)
    return np.asarray(m.hashvalues)


@pytest.mark.parametrize("params", [PARAMS, MinHashParams(num_perm=64, seed=7, ngram=3)])
def test_signature_is_bit_identical_to_datasketch(params: MinHashParams) -> None:
    for text in TRICKY:
        fast = minhash_signature(text, params)
        assert fast.dtype == np.uint64 and fast.shape == (params.num_perm,)
        np.testing.assert_array_equal(fast, _datasketch_loop(text, params), err_msg=repr(text))


def test_signature_chunks_long_documents(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(3)
    text = " ".join(f"w{rng.randrange(500)}" for _ in range(700))
    whole = minhash_signature(text, PARAMS)
    monkeypatch.setattr(dedup, "_PERMUTE_CHUNK_VALUES", 128 * 50)  # 14 chunks of 50 shingles
    np.testing.assert_array_equal(minhash_signature(text, PARAMS), whole)
    np.testing.assert_array_equal(whole, _datasketch_loop(text, PARAMS))


def test_signature_is_pinned() -> None:
    # Signatures must not change between processes, runs or releases without a DEDUP_VERSION bump.
    assert shingle_hash(("hello", "world")) == 0x1ADC8B3FA350B2C1
    assert minhash_signature("Hello, world!", PARAMS)[:2].tolist() == [
        0xD51FBC80B2B5B4A1,
        0xD53F9C4620B8CC60,
    ]


def test_shingles() -> None:
    assert shingles("Hello, World! one two three", 5) == [("hello", "world", "one", "two", "three")]
    assert shingles("a b c d e f", 5) == [("a", "b", "c", "d", "e"), ("b", "c", "d", "e", "f")]
    assert shingles("Too short", 5) == [("too", "short")]
    assert shingles(" ... ", 5) == []
    assert shingles("你好，世界！再见", 5) == [
        ("你", "好", "世", "界", "再"),
        ("好", "世", "界", "再", "见"),
    ]


def test_estimate_jaccard_of_signatures() -> None:
    sig = minhash_signature(TRICKY[0], PARAMS)
    assert estimate_jaccard(sig, minhash_signature(TRICKY[0].upper(), PARAMS)) == 1.0
    assert estimate_jaccard(sig, minhash_signature(TRICKY[1], PARAMS)) < 0.2


# -- exact -----------------------------------------------------------------------------------


def test_exact_key_collapses_case_and_whitespace() -> None:
    key = exact_key("Hello World")
    assert len(key) == 16
    assert exact_key("  hello\t\n  WORLD \u3000") == key
    assert exact_key("Hello World!") != key
    assert exact_key("Hello Worlds") != key
    index = ExactIndex()
    assert index.add(key) is False
    assert index.add(exact_key("HELLO   world")) is True
    assert index.add(exact_key("goodbye")) is False
    assert len(index) == 2


# -- params ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"threshold": 0.0}, "--minhash-threshold must be in (0, 1)"),
        ({"threshold": 1.0}, "--minhash-threshold"),
        ({"threshold": 1.5}, "--minhash-threshold"),
        ({"threshold": math.nan}, "--minhash-threshold"),
        ({"num_perm": 1}, "--minhash-num-perm"),
        ({"num_perm": 64.0}, "--minhash-num-perm"),
        ({"ngram": 0}, "--minhash-ngram"),
        ({"seed": -1}, "--minhash-seed"),
        ({"seed": 2**32}, "--minhash-seed"),
    ],
)
def test_params_validation(kwargs: dict[str, float], flag: str) -> None:
    with pytest.raises(LmforgeError, match=flag.replace("(", r"\(").replace(")", r"\)")):
        MinHashParams(**kwargs)  # type: ignore[arg-type]


def test_default_lsh_parameters() -> None:
    bands, rows = PARAMS.lsh_bands
    assert (bands, rows) == (18, 6)
    assert 1 - (1 - 0.8**rows) ** bands >= 0.995  # LSH surfaces a pair at J = 0.8
    assert PARAMS.min_matches == 92  # 0.718 of 128
    assert (
        MinHashParams(threshold=0.5).lsh_bands[0] * MinHashParams(threshold=0.5).lsh_bands[1] <= 128
    )


# -- planted near-duplicates -----------------------------------------------------------------

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _shingle_set(tokens: list[str], n: int = 5) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def _jaccard(a: set[tuple[str, ...]], b: set[tuple[str, ...]]) -> float:
    return len(a & b) / len(a | b)


def _edit_to(
    base: list[str], target: float, above: bool, pool: list[str], rng: random.Random
) -> list[str]:
    """Random word replacements/insertions/deletions until the shingle Jaccard with `base`
    crosses `target`: the last state still >= target if `above`, else the first one <= it."""
    base_set = _shingle_set(base)
    doc = list(base)
    while True:
        edited = list(doc)
        i = rng.randrange(len(edited))
        op = rng.random()
        if op < 0.6:
            edited[i] = rng.choice(pool)
        elif op < 0.8:
            edited.insert(i, rng.choice(pool))
        else:
            del edited[i]
        j = _jaccard(base_set, _shingle_set(edited))
        if above and j < target:
            return doc
        doc = edited
        if not above and j <= target:
            return doc


@pytest.fixture(scope="module")
def planted_pairs() -> list[tuple[str, str]]:
    """(base, variant) for 150 English-like and 60 Chinese bases, four variants each: two at
    J >= 0.8 (one within [0.80, 0.83] or just above) and two at J <= 0.5."""
    rng = random.Random(20240531)
    vocab = list(
        {"".join(rng.choices(_LETTERS, k=rng.randint(3, 9))) for _ in range(30000)}
    )  # a large vocabulary: unrelated documents share no 5-gram
    cjk_pool = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    bases: list[tuple[list[str], str, list[str]]] = []  # tokens, joiner, edit pool
    for _ in range(150):
        bases.append(([rng.choice(vocab) for _ in range(rng.randint(80, 200))], " ", vocab))
    for _ in range(60):
        bases.append(([rng.choice(cjk_pool) for _ in range(rng.randint(150, 300))], "", cjk_pool))
    pairs = []
    for tokens, joiner, pool in bases:
        base_text = joiner.join(tokens)
        for target, above in [
            (rng.uniform(0.80, 0.83), True),  # the hard edge of the spec
            (rng.uniform(0.80, 0.95), True),
            (rng.uniform(0.45, 0.50), False),  # the hard edge on the other side
            (rng.uniform(0.30, 0.50), False),
        ]:
            pairs.append((base_text, joiner.join(_edit_to(tokens, target, above, pool, rng))))
    return pairs


def _true_jaccard(a: str, b: str) -> float:
    return _jaccard(set(shingles(a, PARAMS.ngram)), set(shingles(b, PARAMS.ngram)))


def test_planted_near_duplicates_recall_and_false_positives(
    planted_pairs: list[tuple[str, str]],
) -> None:
    high = low = caught = flagged = 0
    for base, variant in planted_pairs:
        j = _true_jaccard(base, variant)
        index = NearDuplicateIndex(PARAMS)
        assert index.add("base", minhash_signature(base, PARAMS)) is False
        dup = index.add("variant", minhash_signature(variant, PARAMS))
        if j >= 0.8:
            high += 1
            caught += dup
        elif j <= 0.5:
            low += 1
            flagged += dup
    recall, fp_rate = caught / high, flagged / low
    summary = (
        f"recall {recall:.4f} ({caught}/{high} pairs with J >= 0.8), "
        f"false positives {fp_rate:.4f} ({flagged}/{low} pairs with J <= 0.5)"
    )
    assert high >= 200 and low >= 200, summary
    assert recall >= 0.95, summary
    assert fp_rate <= 0.01, summary


def test_index_of_unrelated_bases_matches_each_variant_to_its_base(
    planted_pairs: list[tuple[str, str]],
) -> None:
    pairs = planted_pairs[::4]  # one J ~ 0.8 variant per base
    index = NearDuplicateIndex(PARAMS)
    for k, (base, _) in enumerate(pairs):
        assert index.add(k, minhash_signature(base, PARAMS)) is False, "unrelated bases collided"
    assert len(index) == len(pairs)
    matched = [index.match(minhash_signature(variant, PARAMS)) for _, variant in pairs]
    assert all(m in (k, None) for k, m in enumerate(matched))
    assert sum(m is not None for m in matched) >= 0.95 * len(pairs)


def test_candidates_equal_datasketch_lsh(
    planted_pairs: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dedup._BandTable, "_MIN_BUFFER", 50)  # exercise the sorted arrays
    bands, rows = PARAMS.lsh_bands
    lsh = MinHashLSH(num_perm=PARAMS.num_perm, params=(bands, rows))
    index = NearDuplicateIndex(PARAMS)
    pairs = planted_pairs[:160]
    for k, (base, _) in enumerate(pairs[::4]):
        sig = minhash_signature(base, PARAMS)
        lsh.insert(k, LeanMinHash(seed=PARAMS.seed, hashvalues=sig, scheme="affine64"))
        assert index.add(k, sig) is False
    nonempty = 0
    for _, variant in pairs:
        sig = minhash_signature(variant, PARAMS)
        expected = lsh.query(LeanMinHash(seed=PARAMS.seed, hashvalues=sig, scheme="affine64"))
        assert index.candidates(sig) == sorted(expected)
        nonempty += bool(expected)
    assert nonempty >= 40


def test_first_occurrence_is_kept() -> None:
    text = " ".join(f"word{i}" for i in range(100))
    near = text.replace("word50", "other")
    index = NearDuplicateIndex(PARAMS)
    assert index.add(1, minhash_signature(text, PARAMS)) is False
    assert index.add(2, minhash_signature(near, PARAMS)) is True
    assert index.match(minhash_signature(near, PARAMS)) == 1
    assert (
        index.add(3, minhash_signature("an unrelated text about something else", PARAMS)) is False
    )
    assert len(index) == 2
    # No words: never a near-duplicate, never kept (exact dedup handles it).
    empty = minhash_signature("!!!", PARAMS)
    assert index.add(4, empty) is False and index.add(5, empty) is False
    assert len(index) == 2
    with pytest.raises(ValueError, match="uint64 signature of 128"):
        index.add(6, np.zeros(64, dtype=np.uint64))
