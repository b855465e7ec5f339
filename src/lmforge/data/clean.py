"""Text normalization and Gopher/C4-style quality filtering, one document at a time.

This file owns what happens to a single document between reading and deduplication:

* `normalize(text)` repairs encoding junk (NFC, lone surrogates, CR/CRLF, control and invisible
  format characters, exotic spaces) and otherwise leaves the text byte-identical — no stripping,
  no collapsing of blank lines — so already-clean corpora such as tinyshakespeare round-trip.
* `QualityFilter(QualityConfig()).apply(text)` removes boilerplate lines (C4) and then either
  keeps the document or drops it, naming the first rule that failed (Gopher and C4 rules).
* Each `FilterResult` says which rule dropped the document and how many lines each line rule
  removed; `prepare` sums them into the data set's manifest.

PII scrubbing and deduplication live elsewhere. Everything here is stdlib-only and picklable.

Sources for the rules and thresholds:
Gopher — Rae et al. 2021, "Scaling Language Models", appendix A.1.1
(https://arxiv.org/abs/2112.11446); C4 — Raffel et al. 2020, section 2.2
(https://arxiv.org/abs/1910.10683).

"Words" are defined once, by `split_words`: text is split on whitespace, except that every
CJK ideograph, kana and hangul character is a word of its own (with any punctuation glued to it),
so the word and n-gram rules also work for Chinese and Japanese, which have no spaces.

The file is long because every threshold is documented on its config field; the rules
themselves are one flat function, `QualityFilter._first_failure`, in the order of FILTER_NAMES.

Typical use, per document in a worker: `result = quality.apply(normalize(raw))`;
`tests/data/test_clean.py` shows every rule firing and not firing.
"""

from __future__ import annotations

import heapq
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate, compress, repeat
from operator import mul

from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# normalize
# --------------------------------------------------------------------------------------------

# ASCII characters that need work: C0 controls except \t and \n (this includes \r), and DEL.
_ASCII_DIRTY = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# C0/C1 controls other than \t \n, which are deleted (the line-breaking ones are handled apart).
_CONTROLS_DELETE = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f]")
# Invisible format characters (category Cf) that are junk in training text: soft hyphen, Arabic
# letter mark, zero-width space, LRM/RLM, bidi embeddings/overrides/isolates, word joiner and
# invisible operators, deprecated format characters, BOM / zero-width no-break space, interlinear
# annotation marks. Kept on purpose: U+200C ZWNJ (Persian, Indic scripts), U+200D ZWJ (emoji
# sequences, Indic scripts), U+180E (Mongolian) and the emoji tag characters U+E0020-U+E007F.
_FORMAT_DELETE = (
    "\u00ad\u061c\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb"
)
# Exotic spaces that become a plain space. U+3000 (ideographic space) is kept: it is the normal
# full-width space of CJK text.
_SPACES = "\u00a0\u2000-\u200a\u202f\u205f"
# Line breaks other than \n: VT, FF, NEL, LINE SEPARATOR, PARAGRAPH SEPARATOR. `str.splitlines`
# breaks lines on all of them, so they become \n rather than being deleted (which would glue the
# words on either side together).
_LINE_BREAKS = "\x0b\x0c\x85\u2028\u2029"
_SURROGATES = "\ud800-\udfff"

_DIRTY = re.compile(
    f"[\\x00-\\x08\\x0b-\\x1f\\x7f-\\x9f{_FORMAT_DELETE}{_SPACES}{_LINE_BREAKS}{_SURROGATES}]"
)
_FORMAT_RE = re.compile(f"[{_FORMAT_DELETE}]")
_SPACES_RE = re.compile(f"[{_SPACES}]")
_LINE_BREAKS_RE = re.compile(f"[{_LINE_BREAKS}]")
_SURROGATES_RE = re.compile(f"[{_SURROGATES}]")


def normalize(text: str) -> str:
    """Repair encoding junk and return the text; clean text comes back unchanged (same object).

    In order: CRLF and lone CR → LF; lone UTF-16 surrogates → U+FFFD (a well-formed high/low pair
    left split in a `str` is joined into its character); VT, FF, NEL, U+2028 and U+2029 → LF;
    other control characters (category Cc) except \\t and \\n are deleted; invisible format
    characters (zero-width space, BOM, LRM/RLM, bidi controls, soft hyphen, word joiner) are
    deleted while ZWNJ and ZWJ are kept; NBSP, U+2000-U+200A, U+202F and U+205F → ' ' while
    U+3000 is kept; finally Unicode NFC. Nothing else changes: no stripping, no collapsing of
    spaces or blank lines.
    """
    if text.isascii():
        if _ASCII_DIRTY.search(text) is None:
            return text
        return _clean_controls(text)
    if _DIRTY.search(text) is None and unicodedata.is_normalized("NFC", text):
        return text
    text = _clean_controls(text)
    if _SURROGATES_RE.search(text) is not None:
        # Joins split pairs; each remaining lone surrogate decodes to one U+FFFD.
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    text = _FORMAT_RE.sub("", text)
    text = _SPACES_RE.sub(" ", text)
    # After the deletions, which can bring a base letter and its combining mark together.
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return text


def _clean_controls(text: str) -> str:
    """Line endings to \\n and control characters deleted (the part ASCII text can need)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _LINE_BREAKS_RE.sub("\n", text)
    return _CONTROLS_DELETE.sub("", text)


# --------------------------------------------------------------------------------------------
# words
# --------------------------------------------------------------------------------------------

# Han (with extensions A-G and compatibility ideographs, 々〆〇), hiragana, katakana (full and
# half width), hangul syllables and jamo: scripts written without spaces between words.
_CJK = (
    "\u1100-\u11ff\u3005-\u3007\u3041-\u3096\u309d-\u309f\u30a1-\u30fa\u30fc-\u30ff"
    "\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\ua960-\ua97f\uac00-\ud7af"
    "\ud7b0-\ud7ff\uf900-\ufaff\uff66-\uff9f\uffa0-\uffdc\U00020000-\U0003134f"
)
_CJK_RE = re.compile(f"[{_CJK}]")
# A CJK character with the punctuation glued to it ("好，"), or a whitespace-delimited run.
_WORD_RE = re.compile(f"[^\\w\\s]*[{_CJK}][^\\w\\s]*|[^\\s{_CJK}]+")
# The same with a group: findall gives "" for a CJK word (no string to build), else the word.
_WORD_SLOT_RE = re.compile(f"[^\\w\\s]*[{_CJK}][^\\w\\s]*|([^\\s{_CJK}]+)")
# N-gram tokens: a CJK character, or a run of letters/digits that may contain inner punctuation
# ("don't", "e.g", "3.14") — i.e. a word with its leading and trailing punctuation stripped.
_TOKEN_RE = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+(?:[^\\w\\s]+[^\\W{_CJK}]+)*")
_ASCII_TOKEN_RE = re.compile(r"\w+(?:[^\w\s]+\w+)*", re.ASCII)  # the same, for ASCII text
_LETTER_RE = re.compile(r"[^\W\d_]")
# In " " + ASCII text: a whitespace-delimited word without a letter (the space is consumed).
_ASCII_LETTERLESS_WORD = re.compile(r"\s[^A-Za-z\s]+(?!\S)")
# ASCII letters and whitespace (as `str.split` sees it), deleted to count the non-letter
# characters of ASCII text fast.
_ASCII_LETTERS_AND_SPACE = str.maketrans(
    "", "", "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"
)


def split_words(text: str) -> list[str]:
    """The words of `text`: whitespace-separated runs, except that each CJK ideograph, kana or
    hangul character is a word of its own, carrying any punctuation glued to it.

    >>> split_words("Hello, world! 你好，世界")
    ['Hello,', 'world!', '你', '好，', '世', '界']
    """
    if text.isascii() or _CJK_RE.search(text) is None:
        return text.split()
    return _WORD_RE.findall(text)


def ngram_tokens(text: str) -> list[str]:
    """The tokens the repetition rules count: the words of `split_words`, lowercased, with
    leading and trailing punctuation stripped; words that are only punctuation are dropped.

    >>> ngram_tokens("The cat -- \\"the CAT's\\" 你好。")
    ['the', 'cat', 'the', "cat's", '你', '好']
    """
    return _TOKEN_RE.findall(text.lower())


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------

# Bump when the same text would be normalized or filtered differently (data set content keys).
CLEAN_VERSION = 1

#: Rules that remove lines and keep the document, in the order they run.
LINE_RULE_NAMES: tuple[str, ...] = ("boilerplate_lines", "short_lines")

_TOP_NGRAM_NS = (2, 3, 4)
_DUP_NGRAM_NS = (5, 6, 7, 8, 9, 10)

#: Rules that drop a document, in the order they are checked; `FilterResult.reason` is the first
#: that fails. These strings go into manifests: never rename one.
FILTER_NAMES: tuple[str, ...] = (
    "empty",
    "lorem_ipsum",
    "curly_bracket",
    "min_chars",
    "max_chars",
    "min_words",
    "max_words",
    "mean_word_length",
    "alpha_fraction",
    "alpha_words",
    "symbol_ratio",
    "bullet_lines",
    "ellipsis_lines",
    "dup_line_fraction",
    "dup_line_char_fraction",
    "dup_para_fraction",
    "dup_para_char_fraction",
    *(f"top_{n}gram" for n in _TOP_NGRAM_NS),
    *(f"dup_{n}gram" for n in _DUP_NGRAM_NS),
)

# C4 removes lines containing "javascript" and lines naming a policy; copyright footers too.
DEFAULT_BOILERPLATE_PHRASES: tuple[str, ...] = (
    "javascript",
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
    "all rights reserved",
)
# Gopher counts lines that start with a bullet point; "-" and "*" are Markdown's bullets.
BULLETS: tuple[str, ...] = ("•", "‣", "◦", "●", "○", "▪", "▫", "■", "□", "▶", "►", "·", "-", "*")
ELLIPSES: tuple[str, ...] = ("...", "…")


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds of the quality rules. For every rule, 0 or None (False for a switch) disables it.

    The defaults are Gopher's and C4's where those suit mixed web text, relaxed where they would
    drop normal books or short documents: no upper bound on length (Gopher drops documents over
    100,000 words, which includes most books), a minimum of 20 characters and 5 words instead of
    Gopher's 50 words, and no line rule that needs terminal punctuation.
    """

    # --- C4 line rules (remove lines, keep the document) ---
    boilerplate_phrases: tuple[str, ...] = DEFAULT_BOILERPLATE_PHRASES
    """A line containing any of these phrases (case-insensitive) is removed ("boilerplate_lines").
    C4 uses "javascript" and the policy/cookie phrases; empty tuple disables."""
    min_line_words: int = 0
    """Lines with fewer words than this are removed ("short_lines"); blank lines are kept.
    C4 uses 3; off by default because verse, dialogue and headings have short lines."""

    # --- document rules ---
    drop_lorem_ipsum: bool = True
    """Drop documents containing "lorem ipsum" (C4), case-insensitive."""
    drop_curly_bracket: bool = False
    """Drop documents containing "{" (C4, against JavaScript). Off: it drops all code and JSON."""
    min_chars: int = 20
    """Drop documents shorter than this many characters (after line removal). CLI: --min-chars."""
    max_chars: int | None = None
    """Drop documents longer than this many characters. None: no limit (books are long)."""
    min_words: int = 5
    """Drop documents with fewer words than this (see `split_words`). Gopher uses 50."""
    max_words: int | None = None
    """Drop documents with more words than this. Gopher uses 100,000, which drops most books."""
    min_mean_word_length: float = 3.0
    """Drop documents whose mean word length (characters, punctuation included) is below this
    (Gopher: 3). Only for space-separated text: the mean is over the words that are not CJK, and
    the rule is skipped when at least half the words are CJK."""
    max_mean_word_length: float | None = 10.0
    """Drop documents whose mean word length is above this (Gopher: 10); same scope as above."""
    min_alpha_fraction: float = 0.5
    """Drop documents where letters (`str.isalpha`: also CJK, kana, hangul) are less than this
    fraction of the non-whitespace characters. Catches tables of numbers and symbol soup."""
    min_alpha_word_fraction: float = 0.8
    """Drop documents where fewer than this fraction of words contain a letter (Gopher: 0.8);
    CJK words count as letters (their one character is, except the rare numeral 〇)."""
    max_symbol_word_ratio: float = 0.1
    """Drop documents where the number of "#", or of ellipses ("..." and "…"), exceeds this many
    per word (Gopher: 0.1 for each)."""
    max_bullet_line_fraction: float = 0.9
    """Drop documents where more than this fraction of non-blank lines start with a bullet
    (Gopher: 0.9). See `BULLETS`."""
    max_ellipsis_line_fraction: float = 0.3
    """Drop documents where more than this fraction of non-blank lines end with an ellipsis
    (Gopher: 0.3)."""
    max_dup_line_fraction: float = 0.30
    """Drop documents where more than this fraction of non-blank lines (compared stripped) occur
    more than once, counting every occurrence (Gopher: 0.30; tinyshakespeare: 0.225)."""
    max_dup_line_char_fraction: float = 0.20
    """Drop documents where lines that occur more than once hold more than this fraction of the
    characters of non-blank lines (Gopher: 0.20; tinyshakespeare: 0.07)."""
    max_dup_para_fraction: float = 0.30
    """As `max_dup_line_fraction`, for paragraphs: blocks separated by blank lines (Gopher)."""
    max_dup_para_char_fraction: float = 0.20
    """As `max_dup_line_char_fraction`, for paragraphs (Gopher: 0.20)."""
    top_ngram_max_fractions: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
    """(n, fraction) for n in 2..4: drop the document when the most frequent n-gram of
    `ngram_tokens`, if it occurs at least twice, covers more than this fraction of the token
    characters, counting every occurrence ("top_{n}gram", Gopher's values)."""
    dup_ngram_max_fractions: tuple[tuple[int, float], ...] = (
        (5, 0.15),
        (6, 0.14),
        (7, 0.13),
        (8, 0.12),
        (9, 0.11),
        (10, 0.10),
    )
    """(n, fraction) for n in 5..10: drop the document when the tokens covered by n-grams that
    occur more than once hold more than this fraction of the token characters ("dup_{n}gram",
    Gopher's values)."""
    ngram_min_words: int = 20
    """The n-gram rules skip documents with fewer tokens than this: on a sentence or two, one
    repeated phrase ("New York ... New York") is a large fraction. 0 applies them always."""

    def __post_init__(self) -> None:
        for name in ("min_line_words", "min_chars", "min_words", "ngram_min_words"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("max_chars", "max_words"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, minimum=1)
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise LmforgeError(
                f"max_chars ({self.max_chars}) must be at least min_chars ({self.min_chars})"
            )
        if self.max_words is not None and self.max_words < self.min_words:
            raise LmforgeError(
                f"max_words ({self.max_words}) must be at least min_words ({self.min_words})"
            )
        for name in ("drop_lorem_ipsum", "drop_curly_bracket"):
            if not isinstance(getattr(self, name), bool):
                raise LmforgeError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _check_number("min_mean_word_length", self.min_mean_word_length, 0.0, None)
        if self.max_mean_word_length is not None:
            _check_number("max_mean_word_length", self.max_mean_word_length, 0.0, None)
            if 0 < self.max_mean_word_length < self.min_mean_word_length:
                raise LmforgeError(
                    f"max_mean_word_length ({self.max_mean_word_length}) must be at least "
                    f"min_mean_word_length ({self.min_mean_word_length})"
                )
        for name in (
            "min_alpha_fraction",
            "min_alpha_word_fraction",
            "max_bullet_line_fraction",
            "max_ellipsis_line_fraction",
            "max_dup_line_fraction",
            "max_dup_line_char_fraction",
            "max_dup_para_fraction",
            "max_dup_para_char_fraction",
        ):
            _check_number(name, getattr(self, name), 0.0, 1.0)
        _check_number("max_symbol_word_ratio", self.max_symbol_word_ratio, 0.0, None)
        _check_ngram_fractions("top_ngram_max_fractions", self.top_ngram_max_fractions, (2, 4))
        _check_ngram_fractions("dup_ngram_max_fractions", self.dup_ngram_max_fractions, (5, 10))
        if isinstance(self.boilerplate_phrases, str) or not all(
            isinstance(p, str) and p.strip() for p in self.boilerplate_phrases
        ):
            raise LmforgeError(
                "boilerplate_phrases must be a list of non-empty strings, "
                f"got {self.boilerplate_phrases!r}"
            )


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LmforgeError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value: object, low: float, high: float | None) -> None:
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and low <= value <= (float("inf") if high is None else high)
    )
    if not ok:
        bound = f"between {low:g} and {high:g}" if high is not None else f">= {low:g}"
        raise LmforgeError(f"{name} must be a number {bound}, got {value!r}")


def _check_ngram_fractions(name: str, pairs: object, n_range: tuple[int, int]) -> None:
    low, high = n_range
    problem = None
    if not isinstance(pairs, tuple | list):
        problem = "must be a list of (n, fraction) pairs"
    else:
        seen: set[int] = set()
        for pair in pairs:
            if not (isinstance(pair, tuple | list) and len(pair) == 2):
                problem = f"has {pair!r}, not an (n, fraction) pair"
                break
            n, fraction = pair
            if isinstance(n, bool) or not isinstance(n, int) or not low <= n <= high:
                problem = f"has n={n!r}; n must be an integer from {low} to {high}"
                break
            if n in seen:
                problem = f"has n={n} twice"
                break
            seen.add(n)
            if (
                isinstance(fraction, bool)
                or not isinstance(fraction, int | float)
                or not 0 <= fraction <= 1
            ):
                problem = f"has fraction {fraction!r} for n={n}; it must be between 0 and 1"
                break
    if problem is not None:
        raise LmforgeError(f"{name} {problem}")


# --------------------------------------------------------------------------------------------
# results and statistics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FilterResult:
    """What `QualityFilter.apply` did to one document."""

    text: str | None
    """The document after line removals (the input object itself when nothing was removed), or
    None when the document was dropped."""
    reason: str | None
    """The first rule of `FILTER_NAMES` that failed, or None when the document is kept."""
    lines_removed: dict[str, int]
    """Lines removed per line rule of `LINE_RULE_NAMES`; rules that removed nothing are absent."""
    chars_in: int
    """Length of the input document."""
    chars_removed: dict[str, int]
    """Characters removed per rule: line rules (lines with their newline) and, when dropped,
    the reason with everything that was left (possibly 0). Sums to `chars_in - len(text or "")`."""

    @property
    def kept(self) -> bool:
        return self.text is not None


# --------------------------------------------------------------------------------------------
# the filter
# --------------------------------------------------------------------------------------------

_PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")


class QualityFilter:
    """Applies a `QualityConfig` to one document at a time; cheap to call, picklable.

    Expects text that went through `normalize` (line breaks are \\n).
    """

    def __init__(self, config: QualityConfig | None = None) -> None:
        self.config = config if config is not None else QualityConfig()
        cfg = self.config
        self._phrases = tuple(p.lower() for p in cfg.boilerplate_phrases)
        self._phrase_re = (
            re.compile("|".join(re.escape(p) for p in self._phrases), re.IGNORECASE)
            if self._phrases
            else None
        )
        self._top = tuple(sorted((n, f) for n, f in cfg.top_ngram_max_fractions if f > 0))
        self._dup = tuple(sorted((n, f) for n, f in cfg.dup_ngram_max_fractions if f > 0))
        logger.debug("quality filter: %s", cfg)

    def __repr__(self) -> str:
        return f"QualityFilter({self.config!r})"

    def apply(self, text: str) -> FilterResult:
        """Remove boilerplate lines, then keep the document or drop it with the failing rule."""
        chars_in = len(text)
        lines_removed: dict[str, int] = {}
        chars_removed: dict[str, int] = {}
        lower = text.lower()
        if self._line_rules_may_fire(lower):
            text = self._remove_lines(text, lines_removed, chars_removed)
            if lines_removed:
                lower = text.lower()
        reason = self._first_failure(text, lower)
        if reason is None:
            return FilterResult(text, None, lines_removed, chars_in, chars_removed)
        chars_removed[reason] = len(text)
        return FilterResult(None, reason, lines_removed, chars_in, chars_removed)

    # ---- line rules ----

    def _line_rules_may_fire(self, lower: str) -> bool:
        return self.config.min_line_words > 0 or any(p in lower for p in self._phrases)

    def _remove_lines(
        self, text: str, lines_removed: dict[str, int], chars_removed: dict[str, int]
    ) -> str:
        if self._phrase_re is not None:
            search = self._phrase_re.search
            text = _drop_lines(
                text,
                lambda line: search(line) is not None,
                "boilerplate_lines",
                lines_removed,
                chars_removed,
            )
        minimum = self.config.min_line_words
        if minimum > 0:
            text = _drop_lines(
                text,
                lambda line: 0 < len(split_words(line)) < minimum,
                "short_lines",
                lines_removed,
                chars_removed,
            )
        return text

    # ---- document rules, in the order of FILTER_NAMES ----

    def _first_failure(self, text: str, lower: str) -> str | None:
        cfg = self.config
        if not text or text.isspace():
            return "empty"
        if cfg.drop_lorem_ipsum and "lorem ipsum" in lower:
            return "lorem_ipsum"
        if cfg.drop_curly_bracket and "{" in text:
            return "curly_bracket"
        n_chars = len(text)
        if n_chars < cfg.min_chars:
            return "min_chars"
        if cfg.max_chars is not None and n_chars > cfg.max_chars:
            return "max_chars"

        ascii_text = text.isascii()  # O(1) in CPython
        if not ascii_text and _CJK_RE.search(text) is not None:
            # The words of `split_words`, with each CJK word (one character) replaced by "".
            slots = _WORD_SLOT_RE.findall(text)
            n_words = len(slots)
            others = list(filter(None, slots))  # the words that are not CJK
            n_cjk = n_words - len(others)
            nonspace = len("".join(text.split()))
        else:
            others = text.split()
            n_words = len(others)
            n_cjk = 0
            nonspace = sum(map(len, others))
        if n_words < cfg.min_words:
            return "min_words"
        if cfg.max_words is not None and n_words > cfg.max_words:
            return "max_words"
        # Only for mostly space-separated text: a CJK word is one character.
        if (cfg.min_mean_word_length > 0 or cfg.max_mean_word_length) and 2 * n_cjk < n_words:
            mean = sum(map(len, others)) / len(others) if n_cjk else nonspace / n_words
            if mean < cfg.min_mean_word_length or (
                cfg.max_mean_word_length and mean > cfg.max_mean_word_length
            ):
                return "mean_word_length"
        if cfg.min_alpha_fraction > 0:
            if ascii_text:
                letters = nonspace - len(text.translate(_ASCII_LETTERS_AND_SPACE))
            else:
                letters = sum(map(str.isalpha, text))
            if letters < cfg.min_alpha_fraction * nonspace:
                return "alpha_fraction"
        if cfg.min_alpha_word_fraction > 0:
            # A CJK word is a CJK character, which is a letter.
            if ascii_text:
                with_letter = n_words - len(_ASCII_LETTERLESS_WORD.findall(" " + text))
            else:
                with_letter = n_cjk + sum(map(bool, map(_LETTER_RE.search, others)))
            if with_letter < cfg.min_alpha_word_fraction * n_words:
                return "alpha_words"
        if cfg.max_symbol_word_ratio > 0:
            limit = cfg.max_symbol_word_ratio * n_words
            if text.count("#") > limit or text.count("...") + text.count("…") > limit:
                return "symbol_ratio"

        lines = list(filter(None, map(str.strip, text.split("\n"))))
        if cfg.max_bullet_line_fraction > 0:
            bullets = sum(map(str.startswith, lines, repeat(BULLETS)))
            if bullets > cfg.max_bullet_line_fraction * len(lines):
                return "bullet_lines"
        if cfg.max_ellipsis_line_fraction > 0:
            ellipses = sum(map(str.endswith, lines, repeat(ELLIPSES)))
            if ellipses > cfg.max_ellipsis_line_fraction * len(lines):
                return "ellipsis_lines"
        reason = _duplicate_failure(
            lines, cfg.max_dup_line_fraction, cfg.max_dup_line_char_fraction, "line"
        )
        if reason is not None:
            return reason
        if (cfg.max_dup_para_fraction > 0 or cfg.max_dup_para_char_fraction > 0) and (
            _PARAGRAPH_BREAK.search(text) is not None
        ):
            paragraphs = list(filter(None, map(str.strip, _PARAGRAPH_BREAK.split(text))))
            reason = _duplicate_failure(
                paragraphs, cfg.max_dup_para_fraction, cfg.max_dup_para_char_fraction, "para"
            )
            if reason is not None:
                return reason

        if self._top or self._dup:
            tokens = (_ASCII_TOKEN_RE if ascii_text else _TOKEN_RE).findall(lower)
            if tokens and len(tokens) >= cfg.ngram_min_words:
                return self._ngram_failure(tokens)
        return None

    def _ngram_failure(self, tokens: list[str]) -> str | None:
        n_tokens = len(tokens)
        counts = Counter(tokens)
        total = sum(map(mul, counts.values(), map(len, counts)))
        if self._top:
            # An n-gram g occurs at most as often as each of its words w, and at most c(w)/k times
            # if w occurs k times in g, so c(g)·len(g) <= the sum of the n largest c(w)·len(w).
            # On normal text that bound is far below the thresholds and no n-gram is counted.
            weights = heapq.nlargest(self._top[-1][0], map(mul, counts.values(), map(len, counts)))
            for n, max_fraction in self._top:
                if n_tokens < n:
                    break
                if sum(weights[:n]) <= max_fraction * total:
                    continue
                keys = _ngram_keys(tokens, n)
                key, count = Counter(keys).most_common(1)[0]
                if count < 2:
                    continue
                start = keys.index(key)
                if count * sum(map(len, tokens[start : start + n])) > max_fraction * total:
                    return f"top_{n}gram"
        if not self._dup:
            return None
        # Positions that start a duplicated n-gram, for the smallest n, over all positions;
        # a duplicated (n+1)-gram starts with a duplicated n-gram, so larger n only look there.
        first_n = self._dup[0][0]
        if n_tokens < first_n:
            return None
        keys = _ngram_keys(tokens, first_n)
        repeated = {key for key, count in Counter(keys).items() if count > 1}
        starts = list(compress(range(len(keys)), map(repeated.__contains__, keys)))
        if not starts:
            return None
        # Character offsets: the characters of tokens[i:j] are prefix[j] - prefix[i].
        prefix = [0, *accumulate(map(len, tokens))]
        # The strictest threshold among the rules after each one, for the early exit below.
        later = [
            min([f for _, f in self._dup[k + 1 :]], default=0.0) for k in range(len(self._dup))
        ]
        n_prev = first_n
        for (n, max_fraction), strictest_later in zip(self._dup, later, strict=True):
            if n != n_prev:
                starts = [i for i in starts if i + n <= n_tokens]
                grams = [hash(tuple(tokens[i : i + n])) for i in starts]
                gram_counts = Counter(grams)
                starts = [i for i, g in zip(starts, grams, strict=True) if gram_counts[g] > 1]
                n_prev = n
            if not starts:
                return None
            covered = _covered_chars(starts, n, prefix)
            if covered > max_fraction * total:
                return f"dup_{n}gram"
            # Coverage only shrinks as n grows: under every later threshold, nothing can fail.
            if covered <= strictest_later * total:
                return None
        return None


def _drop_lines(
    text: str,
    drop: Callable[[str], bool],
    name: str,
    lines_removed: dict[str, int],
    chars_removed: dict[str, int],
) -> str:
    """Remove the non-blank lines for which `drop` is true, recording what went."""
    lines = text.split("\n")
    kept = [line for line in lines if not (line and not line.isspace() and drop(line))]
    n = len(lines) - len(kept)
    if n == 0:
        return text
    new = "\n".join(kept)  # a removed line takes one newline with it
    lines_removed[name] = n
    chars_removed[name] = len(text) - len(new)
    return new


def _ngram_keys(tokens: list[str], n: int) -> list[int]:
    """Hashes of the n-grams of `tokens`, one per start position.

    zip reuses its result tuple once `hash` has let go of it, so this runs at C speed; a 64-bit
    collision (probability ~ len(tokens)² / 2**64) would only merge two counts.
    """
    return list(map(hash, zip(*(tokens[j:] for j in range(n)), strict=False)))


def _covered_chars(starts: list[int], n: int, prefix: list[int]) -> int:
    """Characters of the tokens covered by the n-grams starting at the sorted `starts`."""
    covered = 0
    run_start = run_end = -1
    for i in starts:
        if i > run_end:
            if run_end > run_start:
                covered += prefix[run_end] - prefix[run_start]
            run_start = i
        run_end = i + n
    if run_end > run_start:
        covered += prefix[run_end] - prefix[run_start]
    return covered


def _duplicate_failure(
    items: list[str], max_fraction: float, max_char_fraction: float, unit: str
) -> str | None:
    """Gopher's duplicate line/paragraph rules, counting every occurrence of a repeated item."""
    if not items or (max_fraction <= 0 and max_char_fraction <= 0):
        return None
    counts = Counter(items)
    if len(counts) == len(items):
        return None
    repeated = [(item, c) for item, c in counts.items() if c > 1]
    if max_fraction > 0 and sum(c for _, c in repeated) > max_fraction * len(items):
        return f"dup_{unit}_fraction"
    if max_char_fraction > 0:
        dup_chars = sum(len(item) * c for item, c in repeated)
        if dup_chars > max_char_fraction * sum(map(len, items)):
            return f"dup_{unit}_char_fraction"
    return None
