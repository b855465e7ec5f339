"""N-gram contamination, the pure part: normalization, exact n-gram counts on hand-made texts,
too-short eval examples, and a shared 13-gram found where a shared 12-gram is not."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from lmforge.errors import LmforgeError
from lmforge.eval.contamination import (
    NgramIndex,
    eval_hashes,
    ngram_hash,
    ngrams,
    overlap,
    text_hashes,
    words,
)

# 20 distinct words: any run of them is found only where it was copied.
VOCAB = [
    *("amber", "bishop", "cobalt", "dune", "ember", "fjord", "glacier", "harbor", "iris"),
    *("jasper", "kelp", "lantern", "meadow", "nectar", "orchid", "pebble", "quartz", "raven"),
    *("saffron", "tundra"),
]


def run_of(start: int, length: int) -> str:
    return " ".join(VOCAB[start : start + length])


def test_words_are_nfkc_casefolded_alphanumeric_runs() -> None:
    assert words("Hello, World!  it's 2024_07") == ["hello", "world", "it", "s", "2024", "07"]
    assert words("ＦＵＬＬ width ﬁne") == ["full", "width", "fine"]  # NFKC: full-width, ligature
    assert words("Straße") == words("STRASSE") == ["strasse"]  # casefold, not lower
    assert words("cafe\u0301 café") == ["café", "café"]  # decomposed accent composed
    assert words("naïve 東京 🙂 — x") == ["naïve", "東京", "x"]
    assert words("") == words(" ,.!? ") == []


def test_ngrams_exact_counts() -> None:
    assert ngrams("a b c d", 2) == {("a", "b"), ("b", "c"), ("c", "d")}
    assert ngrams("a b a b a", 2) == {("a", "b"), ("b", "a")}  # distinct only
    assert ngrams("A, b! C", 3) == {("a", "b", "c")}
    assert ngrams("a b", 3) == set()  # fewer than n words: none
    assert len(ngrams(run_of(0, 20), 13)) == 8
    assert text_hashes("x y z", 2) == {ngram_hash(("x", "y")), ngram_hash(("y", "z"))}
    digest = hashlib.blake2b(b"x y", digest_size=8).digest()
    assert ngram_hash(["x", "y"]) == int.from_bytes(digest, "little")
    with pytest.raises(LmforgeError, match="at least 1"):
        ngrams("a", 0)


def test_index_counts_and_only_filter() -> None:
    index = NgramIndex(3)
    assert index.add("a b c d e") == 3
    assert index.add("a b c") == 1  # repeated: seen again, stored once
    assert index.add("a b") == 0
    assert (index.ngrams_seen, len(index), index.texts_seen) == (4, 3, 3)
    assert ngram_hash(("c", "d", "e")) in index

    only = eval_hashes(["c d e f"], 3)
    filtered = NgramIndex(3, only=only)
    filtered.add("a b c d e f g")
    assert filtered.ngrams_seen == 5
    assert filtered.hashes == only == text_hashes("c d e f", 3)


def test_continued_parts_join_across_the_seam() -> None:
    whole = NgramIndex(3)
    whole.add("one two three four five")
    parts = NgramIndex(3)
    parts.add("one two th")
    parts.add("ree four five", continued=True)  # a word cut in two is joined again
    assert parts.hashes == whole.hashes | text_hashes("one two th", 3)
    spaced = NgramIndex(3)
    spaced.add("one two\n\n")
    spaced.add("three four five", continued=True)
    assert spaced.hashes == whole.hashes
    separate = NgramIndex(3)
    separate.add("one two")
    separate.add("three four five")  # not continued: no n-gram across
    assert len(separate) == 1


def test_13gram_overlap_found_but_12gram_not() -> None:
    train = f"Preface words here. {run_of(0, 13)}. And then {run_of(14, 6)} end."
    index = NgramIndex(13)
    index.add(train)
    shared_12 = f"{run_of(0, 12)} zebra"  # 12 shared words, then one that differs: 1 13-gram
    shared_13 = f"Question: {run_of(0, 13).upper()}?"  # case and punctuation differ: 2 13-grams
    result = overlap([shared_12, shared_13, "too short"], index)
    assert result.n == 13
    assert (result.eval_examples, result.too_short) == (3, 1)
    assert result.eval_ngrams == 1 + 2
    assert result.overlapping_ngrams == 1  # amber … meadow; "question amber … lantern" is not
    assert (result.examples_flagged, result.flagged_examples) == (1, [1])
    assert result.ngram_rate == pytest.approx(1 / 3)
    assert result.example_rate == pytest.approx(1 / 3)

    assert overlap([shared_12], index).examples_flagged == 0
    assert overlap([run_of(1, 13)], index).examples_flagged == 0  # shifted: 12 shared
    exact = run_of(0, 13)
    result = overlap([shared_12, exact, "too short", exact], index)
    assert (result.examples_flagged, result.flagged_examples) == (2, [1, 3])
    assert (result.eval_ngrams, result.overlapping_ngrams) == (2, 1)  # distinct n-grams


def test_overlap_numbers_and_dict() -> None:
    index = NgramIndex(2)
    index.add("red fish blue fish")
    texts = ["one fish two fish", "red fish", "blue", "blue fish red fish", ""]
    result = overlap(texts, index, keep_flagged=1)
    # distinct eval bigrams: one fish, fish two, two fish, red fish, blue fish, fish red
    assert result.eval_ngrams == 6
    assert result.overlapping_ngrams == 2  # red fish, blue fish (fish blue is not asked)
    assert result.examples_flagged == 2 and result.flagged_examples == [1]
    assert result.too_short == 2
    assert result.to_dict() == {
        "n": 2,
        "eval_examples": 5,
        "eval_ngrams": 6,
        "overlapping_ngrams": 2,
        "examples_flagged": 2,
        "too_short": 2,
        "ngram_rate": pytest.approx(2 / 6),
        "example_rate": pytest.approx(2 / 5),
        "flagged_examples": [1],
    }
    empty = overlap([], index)
    assert (empty.ngram_rate, empty.example_rate, empty.eval_examples) == (0.0, 0.0, 0)
    with pytest.raises(LmforgeError, match="holds 2-grams"):
        overlap(texts, index, 3)


@pytest.mark.parametrize("n", [1, 2, 13])
def test_parts_cut_at_spaces_index_like_the_whole(n: int) -> None:
    text = " ".join(f"{VOCAB[i % 20]}{i}" for i in range(40))
    whole = NgramIndex(n)
    whole.add(text)
    parts = NgramIndex(n)
    cuts = [0, 7, 16, 40, len(text)]  # parts of one word and of fewer than n words
    cuts = [text.index(" ", c) + 1 if 0 < c < len(text) else c for c in cuts]
    assert len(set(cuts)) == len(cuts)
    for i, (a, b) in enumerate(itertools.pairwise(cuts)):
        parts.add(text[a:b], continued=i > 0)
    assert parts.hashes == whole.hashes
    assert parts.ngrams_seen == whole.ngrams_seen == 40 - n + 1
