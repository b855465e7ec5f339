"""N-gram contamination: how much of an eval set appears word for word in training text.

This file owns the pure part of the check — normalization, n-grams, their hashes, the index
of training n-grams and the overlap numbers — with no torch and no files. Which texts a model
was trained on is `ops/contamination.py`'s business.

The method is GPT-3's (Brown et al. 2020, appendix C) as lm-eval-harness's `decontamination`
restates it: an eval example is *contaminated* when any of its 13-grams (word n-grams after
normalization) also occurs in the training data.

Normalization (`words`): Unicode NFKC (so full-width letters, ligatures and composed /
decomposed accents compare equal), then `str.casefold` (Unicode lower-casing, e.g. "ß" →
"ss"), then the words are the maximal runs of letters and digits (`str.isalnum` characters):
every other character — spaces, punctuation, underscores, symbols, emoji — separates words and
is dropped. So "Hello, World!" and "hello world" have the same n-grams. Scripts written without
spaces (Chinese, Japanese) become one "word" per run between punctuation, so they only match
at that coarser grain.

Memory: an n-gram is stored as the 8-byte blake2b hash of its words joined by a space
(`ngram_hash`), about 80 bytes each in a Python set whatever n is. An `NgramIndex` made with
`only=` (the eval set's hashes, `eval_hashes`) stores just the training n-grams that also
occur in the eval set, so streaming a large corpus needs memory in proportion to the small
eval set, not to the corpus. A false match needs a 64-bit hash collision (~1e-19 per pair).

    from lmforge.eval.contamination import NgramIndex, eval_hashes, overlap

    eval_texts = ["the quick brown fox jumps over the lazy dog near the river bank today"]
    index = NgramIndex(n=13, only=eval_hashes(eval_texts, 13))
    for text in training_texts:            # streamed: nothing but matching hashes is kept
        index.add(text)
    result = overlap(eval_texts, index)    # result.examples_flagged, result.ngram_rate, …
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lmforge.errors import LmforgeError

DEFAULT_N = 13  # GPT-3 / lm-eval-harness decontamination
FLAGGED_KEPT = 5  # flagged example indices an `OverlapResult` lists
_WORD = re.compile(r"[^\W_]+")  # runs of letters and digits: \w without the underscore


def words(text: str) -> list[str]:
    """TEXT normalized into words: NFKC, casefolded, split on every non-alphanumeric char."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def ngrams(text: str, n: int = DEFAULT_N) -> set[tuple[str, ...]]:
    """The distinct word N-grams of TEXT (empty when it has fewer than N words)."""
    _check_n(n)
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def ngram_hash(gram: Sequence[str]) -> int:
    """The 64-bit hash an n-gram is stored as: blake2b-8 of its words joined by a space."""
    return _hash_joined(" ".join(gram))


def _hash_joined(joined: str) -> int:
    digest = hashlib.blake2b(joined.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _hashes(w: Sequence[str], n: int) -> Iterable[int]:
    for i in range(len(w) - n + 1):
        yield _hash_joined(" ".join(w[i : i + n]))


def text_hashes(text: str, n: int = DEFAULT_N) -> set[int]:
    """The hashes of TEXT's distinct N-grams."""
    _check_n(n)
    return set(_hashes(words(text), n))


def eval_hashes(texts: Iterable[str], n: int = DEFAULT_N) -> set[int]:
    """The hashes of every N-gram of TEXTS: the `only=` filter for an `NgramIndex`."""
    _check_n(n)
    out: set[int] = set()
    for text in texts:
        out.update(_hashes(words(text), n))
    return out


def _check_n(n: int) -> None:
    if n < 1:
        raise LmforgeError(f"n-gram size must be at least 1, not {n}")


class NgramIndex:
    """Hashes of the word N-grams of training texts added one at a time.

    `only`: keep just the hashes in this set (the eval set's), so memory follows the eval set.
    `add(text, continued=True)` treats TEXT as the continuation of the previous text (the
    parts a big file is read in): n-grams across the seam are counted, and a word cut in two
    at the seam is joined again (the previous part's last n-gram, which ended in half the word,
    stays indexed: one spurious n-gram per such cut).
    """

    def __init__(self, n: int = DEFAULT_N, *, only: set[int] | None = None) -> None:
        _check_n(n)
        self.n = n
        self.only = only
        self.hashes: set[int] = set()
        self.ngrams_seen = 0  # n-gram positions read, repeats included
        self.texts_seen = 0
        self._tail: list[str] = []  # the previous text's last n words
        self._tail_open = False  # it ended inside a word

    def add(self, text: str, *, continued: bool = False) -> int:
        """Index TEXT's n-grams; returns how many n-gram positions it had."""
        w = words(text)
        if continued and self._tail:
            if self._tail_open and text[:1].isalnum() and w:
                w = [*self._tail[:-1], self._tail[-1] + w[0], *w[1:]]
            else:
                w = [*self._tail[max(0, len(self._tail) - self.n + 1) :], *w]
        n = self.n
        count = max(0, len(w) - n + 1)
        if self.only is None:
            self.hashes.update(_hashes(w, n))
        else:
            only = self.only
            self.hashes.update(h for h in _hashes(w, n) if h in only)
        self._tail = w[-n:]
        self._tail_open = text[-1:].isalnum()
        self.ngrams_seen += count
        self.texts_seen += 1
        return count

    def update(self, other: NgramIndex) -> None:
        """Merge OTHER (same n) into this index."""
        if other.n != self.n:
            raise LmforgeError(f"cannot merge {other.n}-grams into {self.n}-grams")
        self.hashes |= other.hashes
        self.ngrams_seen += other.ngrams_seen
        self.texts_seen += other.texts_seen

    def __contains__(self, hash_: object) -> bool:
        return hash_ in self.hashes

    def __len__(self) -> int:
        return len(self.hashes)


@dataclass(frozen=True)
class OverlapResult:
    """How much of an eval set a training index covers.

    `eval_ngrams` counts the eval set's *distinct* n-grams (an n-gram in two examples counts
    once), `overlapping_ngrams` those of them found in training. An example is flagged when
    any of its n-grams was found; `too_short` examples (fewer than n words) have no n-grams
    and are never flagged, but count in `eval_examples` and so in `example_rate`'s denominator.
    """

    n: int
    eval_examples: int
    eval_ngrams: int
    overlapping_ngrams: int
    examples_flagged: int
    too_short: int
    flagged_examples: list[int] = field(default_factory=list)  # the first few, 0-based

    @property
    def ngram_rate(self) -> float:
        return self.overlapping_ngrams / self.eval_ngrams if self.eval_ngrams else 0.0

    @property
    def example_rate(self) -> float:
        return self.examples_flagged / self.eval_examples if self.eval_examples else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        flagged = out.pop("flagged_examples")
        out.update(ngram_rate=self.ngram_rate, example_rate=self.example_rate)
        return {**out, "flagged_examples": flagged}


def overlap(
    eval_texts: Sequence[str],
    index: NgramIndex,
    n: int | None = None,
    *,
    keep_flagged: int = FLAGGED_KEPT,
) -> OverlapResult:
    """EVAL_TEXTS' N-grams (N defaults to the index's) looked up in INDEX.

    Texts with fewer than N words contribute no n-grams and are counted as `too_short`.
    """
    n = index.n if n is None else n
    if n != index.n:
        raise LmforgeError(f"the index holds {index.n}-grams, not {n}-grams")
    distinct: set[int] = set()
    found: set[int] = set()
    flagged: list[int] = []
    n_flagged = too_short = 0
    for i, text in enumerate(eval_texts):
        hashes = text_hashes(text, n)
        if not hashes:
            too_short += 1
            continue
        hits = {h for h in hashes if h in index}
        distinct |= hashes
        found |= hits
        if hits:
            n_flagged += 1
            if len(flagged) < keep_flagged:
                flagged.append(i)
    return OverlapResult(
        n=n,
        eval_examples=len(eval_texts),
        eval_ngrams=len(distinct),
        overlapping_ngrams=len(found),
        examples_flagged=n_flagged,
        too_short=too_short,
        flagged_examples=flagged,
    )
