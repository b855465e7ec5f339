"""Duplicate removal for the data stage: exact keys and MinHash near-duplicate detection.

The orchestrator (`lmforge.data.prepare`) computes `exact_key` and `minhash_signature` in worker
processes, then visits documents in order in the main process: the first occurrence is kept,
later ones that `ExactIndex.add` or `NearDuplicateIndex.add` flag are removed. Both per-document
functions are pure functions of the text and picklable `MinHashParams`, and every hash here is
stable across processes, runs and machines (no Python `hash()`).

Exact keys
    `exact_key(text)` is the 16-byte blake2b digest of the text casefolded, with every run of
    Unicode whitespace collapsed to one space and the ends stripped (`" ".join(t.split())`).

Shingles
    Words are runs of Unicode word characters (Python's `\\w`: letters, digits, `_`) of the
    casefolded text; punctuation and symbols separate words and are dropped. Every Han, kana
    or halfwidth-katakana character is a word on its own, so Chinese and Japanese text (written
    without spaces) is shingled by characters: with the default `ngram=5`, a shingle is 5
    consecutive words in Latin-script text and 5 consecutive characters in CJK text, with no
    language detection needed for mixed text. A document with fewer than `ngram` words has one
    shingle, all of its words; one with no words has none.

Signature hash (version `DEDUP_VERSION`)
    A word w with code points c_0..c_{m-1} hashes to
    `fmix64((sum_i c_i * P**i + m * K) mod 2**64)`; a shingle of words w_0..w_{k-1} hashes to
    `sum_j H(w_j) * Q**(k-1-j) mod 2**64` (Horner). `fmix64` is the MurmurHash3 64-bit
    finalizer; P, Q, K are fixed odd constants below. This polynomial form lets
    `minhash_signature` hash every word of a document with a handful of numpy prefix sums
    instead of one hashlib call per word. The shingle hashes then go through datasketch's
    "affine64" scheme (fmix64, then `a_k * h + b_k mod 2**64` for each of `num_perm`
    permutations drawn by datasketch from `seed`), so the result is bit-identical to
    `datasketch.MinHash(num_perm, seed, hashfunc=shingle_hash, scheme="affine64")` updated with
    every shingle of `shingles(text, ngram)`. `bench/data.py` compares it with the naive
    per-shingle datasketch loop (sha1 per shingle).

What `threshold` means
    `threshold` t is the shingle-set Jaccard similarity from which a later document must be
    caught. `NearDuplicateIndex` flags a document when a kept document shares an LSH band with
    it (the bands are chosen so that a pair at Jaccard exactly t shares one with probability
    >= 99.5%) and the fraction of equal signature values (the MinHash estimate of Jaccard) is
    at least `t - 2.326 * sqrt(t * (1 - t) / num_perm)`, the one-sided 99% lower bound of the
    estimate at t (0.718, i.e. 92 of 128 values, for t=0.8). So a pair at J >= t is caught
    with probability >= ~98.5%, and pairs a little below t are caught too. Measured for t=0.8,
    128 permutations, LSH 18 bands x 6 rows: 98.8% at J=0.80, 80% at 0.75, 54% at 0.72, 5% at
    0.65, 0.2% at 0.60, 0 of 3000 at 0.50 (theory: 1e-7).

Index memory
    `datasketch.MinHashLSH` keeps a Python set per bucket, ~7 KB per document with 18 bands,
    which is 2 GB for 300k documents. `NearDuplicateIndex` stores the same bands as 64-bit band
    hashes in one sorted numpy array (12 bytes per band per document, fed through a small dict
    buffer) and the low 32 bits of each signature value for the confirmation step (512 bytes
    with 128 permutations): measured 1.0 KB per kept document including the caller's int key
    (100 MB for 100k documents, 300 MB for 300k). The tests check that its LSH candidates equal
    `MinHashLSH.query` with the same bands. Documents are added at ~15-25k per second.

Tests: `pytest tests/data/test_dedup.py` (bit-identity with datasketch, planted pairs).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from datasketch import MinHash

from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)

# Bump when exact keys, shingles, the signature hash or the index decision change: it is part of
# the data set's content key, so old shards are not reused under new rules.
DEDUP_VERSION = 1

U64 = npt.NDArray[np.uint64]

_MASK64 = (1 << 64) - 1
_P = 0x9E3779B97F4A7C15  # code-point polynomial base (odd: invertible mod 2**64)
_P_INV = pow(_P, -1, 1 << 64)
_Q = 0xC2B2AE3D27D4EB4F  # word-hash polynomial base for shingles
_K = 0x165667B19E3779F9  # word-length term, so words of different lengths never share raw sums
_EMPTY = np.uint64(_MASK64)  # a signature value no shingle has produced (datasketch's init)

# Han (CJK unified + extensions + compatibility), hiragana, katakana, halfwidth katakana.
# Each of these characters is a word by itself. Hangul is not here: Korean uses spaces.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\U00020000-\U000323af"
_WORD_RE = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")
_SEP, _WORD, _CJK_CHAR = 0, 1, 2

# Permutation step: at most this many [num_perm, chunk] uint64 values at once (8 MB).
_PERMUTE_CHUNK_VALUES = 1 << 20
# The LSH step must surface a pair at Jaccard == threshold with at least this probability.
_LSH_RECALL = 0.995
# One-sided 99% normal quantile: the confirmation margin below threshold, in standard errors.
_MARGIN_Z = 2.326


# -- parameters ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MinHashParams:
    """How near-duplicates are found; picklable, so workers compute signatures with it."""

    num_perm: int = 128  # signature length; the estimate's std error is sqrt(J(1-J)/num_perm)
    seed: int = 1  # datasketch's permutation seed; signatures only compare under equal seeds
    ngram: int = 5  # words per shingle (CJK: characters per shingle)
    threshold: float = 0.8  # Jaccard from which a pair is caught; see the module docstring

    def __post_init__(self) -> None:
        if not _is_int(self.num_perm) or self.num_perm < 2:
            raise LmforgeError(f"--minhash-num-perm must be an integer >= 2, got {self.num_perm!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise LmforgeError(
                f"--minhash-seed must be an integer in [0, 2**32), got {self.seed!r}"
            )
        if not _is_int(self.ngram) or self.ngram < 1:
            raise LmforgeError(f"--minhash-ngram must be an integer >= 1, got {self.ngram!r}")
        if (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, int | float)
            or not 0.0 < self.threshold < 1.0
        ):
            raise LmforgeError(f"--minhash-threshold must be in (0, 1), got {self.threshold!r}")

    @property
    def lsh_bands(self) -> tuple[int, int]:
        """(bands, rows per band): the largest band size whose band count, chosen so that a pair
        at Jaccard == threshold shares a band with probability >= 99.5%, fits in num_perm."""
        return _lsh_bands(self.threshold, self.num_perm)

    @property
    def min_matches(self) -> int:
        """Equal signature values needed to confirm a candidate: threshold minus the one-sided
        99% margin of the estimate, in values out of num_perm."""
        t, n = self.threshold, self.num_perm
        cutoff = t - _MARGIN_Z * math.sqrt(t * (1.0 - t) / n)
        return max(1, math.ceil(cutoff * n - 1e-9))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@functools.lru_cache(maxsize=64)
def _lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    best: tuple[int, int] | None = None
    for rows in range(1, num_perm + 1):
        p_band = threshold**rows  # P(one band equal) for a pair at Jaccard == threshold
        bands = math.ceil(math.log(1.0 - _LSH_RECALL) / math.log1p(-p_band))
        if bands * rows <= num_perm:
            best = (bands, rows)
    if best is None:
        log.warning(
            "%d permutations cannot reach %.1f%% LSH recall at threshold %.2f; "
            "using %d single-value bands",
            num_perm, 100 * _LSH_RECALL, threshold, num_perm,
        )  # fmt: skip
        best = (num_perm, 1)
    return best


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[U64, U64]:
    """datasketch's own affine64 permutation parameters (a, b) for (num_perm, seed)."""
    a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine64").permutations
    a, b = a.astype(np.uint64), b.astype(np.uint64)
    a.setflags(write=False)
    b.setflags(write=False)
    return a, b


# -- exact -----------------------------------------------------------------------------------


def exact_key(text: str) -> bytes:
    """16-byte blake2b of the text casefolded, whitespace runs collapsed to one space, stripped."""
    normalized = " ".join(text.casefold().split())
    return hashlib.blake2b(normalized.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class ExactIndex:
    """The exact keys seen so far (~100 bytes per document)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def add(self, key: bytes) -> bool:
        """True if `key` was seen before; otherwise remember it and return False."""
        if key in self._seen:
            return True
        self._seen.add(key)
        return False

    def __len__(self) -> int:
        return len(self._seen)


# -- shingles --------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """The casefolded words of `text`: `\\w` runs, each CJK character a word by itself."""
    return _WORD_RE.findall(text.casefold())


def shingles(text: str, n: int = 5) -> list[tuple[str, ...]]:
    """Word n-grams of `text` in order (duplicates kept); one shingle of all words if fewer
    than n; none if the text has no words. CJK characters are words, so CJK text gets
    n-character shingles."""
    w = words(text)
    if len(w) < n:
        return [tuple(w)] if w else []
    return [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]


def word_hash(word: str) -> int:
    """The 64-bit hash of one (casefolded) word; scalar form of the vectorized one."""
    raw, power = 0, 1
    for ch in word:
        raw = (raw + ord(ch) * power) & _MASK64
        power = (power * _P) & _MASK64
    return _fmix64_int((raw + len(word) * _K) & _MASK64)


def shingle_hash(shingle: tuple[str, ...]) -> int:
    """The 64-bit hash of a shingle; pass as `hashfunc` to datasketch to reproduce signatures."""
    h = 0
    for word in shingle:
        h = (h * _Q + word_hash(word)) & _MASK64
    return h


def _fmix64_int(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _MASK64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _MASK64
    return h ^ (h >> 33)


def _fmix64(h: U64) -> U64:
    """MurmurHash3's 64-bit finalizer, elementwise (uint64 arithmetic wraps: mod 2**64)."""
    h = h ^ (h >> np.uint64(33))
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


@functools.lru_cache(maxsize=1)
def _char_classes() -> npt.NDArray[np.uint8]:
    """Class of every code point (_SEP, _WORD, _CJK_CHAR), derived from `_WORD_RE` itself so
    the vectorized words are exactly `words()`. Built once per process (~0.1 s, 1.1 MB)."""
    every_char = np.arange(0x110000, dtype=np.uint32).tobytes().decode("utf-32-le", "surrogatepass")
    table = np.zeros(0x110000, dtype=np.uint8)
    for m in re.finditer(r"\w+", every_char):
        table[m.start() : m.end()] = _WORD
    for m in re.finditer(rf"[{_CJK}]+", every_char):
        table[m.start() : m.end()] = _CJK_CHAR
    table.setflags(write=False)
    return table


def _powers(base: int, count: int) -> U64:
    """[base**0, base**1, ..., base**(count-1)] mod 2**64."""
    out = np.full(count, base, dtype=np.uint64)
    out[0] = 1
    return np.cumprod(out, dtype=np.uint64)


def _word_hashes(text: str) -> U64:
    """`word_hash` of every word of `text`, in order, via prefix sums over code points."""
    cps = np.frombuffer(text.casefold().encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    if cps.size == 0:
        return np.empty(0, dtype=np.uint64)
    cls = _char_classes()[cps]
    word = cls == _WORD
    cjk = cls == _CJK_CHAR
    prev_word = np.concatenate(([False], word[:-1]))
    next_word = np.concatenate((word[1:], [False]))
    starts = np.flatnonzero(cjk | (word & ~prev_word))
    ends = np.flatnonzero(cjk | (word & ~next_word)) + 1
    if starts.size == 0:
        return np.empty(0, dtype=np.uint64)
    # prefix[k] = sum_{i<k} c_i * P**i; a word's raw sum is (prefix[e] - prefix[s]) * P**-s.
    prefix = np.zeros(cps.size + 1, dtype=np.uint64)
    np.cumsum(cps.astype(np.uint64) * _powers(_P, cps.size), out=prefix[1:])
    raw = (prefix[ends] - prefix[starts]) * _powers(_P_INV, cps.size)[starts]
    raw += (ends - starts).astype(np.uint64) * np.uint64(_K)
    return _fmix64(raw)


def _shingle_hashes(word_hashes: U64, n: int) -> U64:
    """`shingle_hash` of every n-gram of consecutive words (one of all words if fewer)."""
    count = max(word_hashes.size - n + 1, 1)
    span = min(n, word_hashes.size)
    h = word_hashes[:count].copy()
    for j in range(1, span):
        h *= np.uint64(_Q)
        h += word_hashes[j : j + count]
    return h


def minhash_signature(text: str, params: MinHashParams) -> U64:
    """The MinHash signature of `text` (uint64, `params.num_perm` values), bit-identical to
    datasketch's affine64 MinHash updated with `shingle_hash` of every shingle. All values are
    2**64-1 when the text has no words."""
    a, b = _permutations(params.num_perm, params.seed)
    signature = np.full(params.num_perm, _EMPTY, dtype=np.uint64)
    word_hashes = _word_hashes(text)
    if word_hashes.size == 0:
        return signature
    mixed = _fmix64(_shingle_hashes(word_hashes, params.ngram))  # datasketch's affine64 pre-mix
    chunk = max(1, _PERMUTE_CHUNK_VALUES // params.num_perm)
    for start in range(0, mixed.size, chunk):
        phv = np.multiply.outer(a, mixed[start : start + chunk])  # [num_perm, chunk]
        phv += b[:, None]
        np.minimum(signature, phv.min(axis=1), out=signature)
    return signature


def estimate_jaccard(a: U64, b: U64) -> float:
    """The MinHash estimate of Jaccard similarity: the fraction of equal signature values."""
    return float(np.count_nonzero(a == b)) / a.size


# -- near-duplicate index --------------------------------------------------------------------


class _BandTable:
    """A multimap from 64-bit band hash to document number, 12 bytes per entry.

    Entries live in two sorted numpy arrays; new ones go to a dict first and are merged in when
    the dict holds max(64k, 1/32 of the arrays) entries, so each entry is copied a bounded
    number of times (a few dozen) however large the index grows; the dict stays small.
    """

    _MIN_BUFFER = 1 << 16

    def __init__(self) -> None:
        self._keys = np.empty(0, dtype=np.uint64)
        self._docs = np.empty(0, dtype=np.uint32)
        self._buffer: dict[int, int | list[int]] = {}
        self._buffered = 0

    def __len__(self) -> int:
        return self._keys.size + self._buffered

    def lookup(self, band_hashes: U64) -> set[int]:
        found: set[int] = set()
        if self._keys.size:
            lo = np.searchsorted(self._keys, band_hashes, side="left")
            hit = self._keys[np.minimum(lo, self._keys.size - 1)] == band_hashes
            if hit.any():  # rare: a kept document shares this band
                hi = np.searchsorted(self._keys, band_hashes[hit], side="right")
                for start, stop in zip(lo[hit].tolist(), hi.tolist(), strict=True):
                    found.update(self._docs[start:stop].tolist())
        for h in band_hashes.tolist():
            docs = self._buffer.get(h)
            if docs is None:
                continue
            if isinstance(docs, int):
                found.add(docs)
            else:
                found.update(docs)
        return found

    def insert(self, band_hashes: U64, doc: int) -> None:
        for h in band_hashes.tolist():
            docs = self._buffer.get(h)
            if docs is None:
                self._buffer[h] = doc
            elif isinstance(docs, int):
                self._buffer[h] = [docs, doc]
            else:
                docs.append(doc)
        self._buffered += band_hashes.size
        if self._buffered >= max(self._MIN_BUFFER, self._keys.size // 32):
            self._merge()

    def _merge(self) -> None:
        keys: list[int] = []
        docs: list[int] = []
        for h, d in self._buffer.items():
            if isinstance(d, int):
                keys.append(h)
                docs.append(d)
            else:
                keys.extend([h] * len(d))
                docs.extend(d)
        new_keys = np.array(keys, dtype=np.uint64)
        new_docs = np.array(docs, dtype=np.uint32)
        order = np.argsort(new_keys, kind="stable")
        new_keys, new_docs = new_keys[order], new_docs[order]
        at = np.searchsorted(self._keys, new_keys, side="right")
        self._keys = np.insert(self._keys, at, new_keys)
        self._docs = np.insert(self._docs, at, new_docs)
        self._buffer = {}
        self._buffered = 0


class NearDuplicateIndex:
    """The kept documents' MinHash bands and signatures; `add` decides near-duplicates.

    LSH banding as in `datasketch.MinHashLSH(params=params.lsh_bands)` (bands are consecutive
    runs of rows signature values), then confirmation by estimated Jaccard against
    `params.min_matches`; see the module docstring for what `threshold` guarantees.
    """

    _SIG_BLOCK = 4096  # signatures are stored in blocks of this many rows

    def __init__(self, params: MinHashParams) -> None:
        self.params = params
        self.bands, self.rows = params.lsh_bands
        self._min_matches = params.min_matches
        # Band hash: fmix64(sum_j value_j * M_j + T_band) mod 2**64; odd M_j, distinct T_band.
        self._row_mult = _fmix64(np.arange(1, self.rows + 1, dtype=np.uint64)) | np.uint64(1)
        self._band_tag = _fmix64(np.arange(1, self.bands + 1, dtype=np.uint64) << np.uint64(32))
        self._table = _BandTable()
        self._blocks: list[npt.NDArray[np.uint32]] = []  # low 32 bits of kept signatures
        self._keys: list[Hashable] = []

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: Hashable, signature: U64) -> bool:
        """True if `signature` is a near-duplicate of a kept document (then it is not kept);
        otherwise keep it under `key` and return False. A signature of a text with no words
        is never a near-duplicate and is not kept (only exact dedup applies to it)."""
        self._check(signature)
        if bool(np.all(signature == _EMPTY)):
            return False
        band_hashes = self._band_hashes(signature)
        if self._best_match(band_hashes, signature) is not None:
            return True
        doc = len(self._keys)
        if doc % self._SIG_BLOCK == 0:
            self._blocks.append(np.empty((self._SIG_BLOCK, self.params.num_perm), np.uint32))
        self._blocks[-1][doc % self._SIG_BLOCK] = signature.astype(np.uint32)  # low 32 bits
        self._keys.append(key)
        self._table.insert(band_hashes, doc)
        return False

    def match(self, signature: U64) -> Hashable | None:
        """The key of the most similar kept document that `add` would count this one a
        near-duplicate of, or None."""
        self._check(signature)
        if bool(np.all(signature == _EMPTY)):
            return None
        doc = self._best_match(self._band_hashes(signature), signature)
        return None if doc is None else self._keys[doc]

    def candidates(self, signature: U64) -> list[Hashable]:
        """Keys of the kept documents sharing at least one LSH band (before confirmation)."""
        self._check(signature)
        return [self._keys[doc] for doc in sorted(self._table.lookup(self._band_hashes(signature)))]

    def _check(self, signature: U64) -> None:
        if signature.shape != (self.params.num_perm,) or signature.dtype != np.uint64:
            raise ValueError(
                f"expected a uint64 signature of {self.params.num_perm} values, "
                f"got {signature.dtype} {signature.shape}"
            )

    def _band_hashes(self, signature: U64) -> U64:
        bands = signature[: self.bands * self.rows].reshape(self.bands, self.rows)
        mixed = (bands * self._row_mult).sum(axis=1, dtype=np.uint64) + self._band_tag
        return _fmix64(mixed)

    def _best_match(self, band_hashes: U64, signature: U64) -> int | None:
        docs = self._table.lookup(band_hashes)
        if not docs:
            return None
        order = sorted(docs)
        kept = np.stack([self._blocks[d // self._SIG_BLOCK][d % self._SIG_BLOCK] for d in order])
        matches = np.count_nonzero(kept == signature.astype(np.uint32), axis=1)
        best = int(np.argmax(matches))
        return order[best] if int(matches[best]) >= self._min_matches else None
