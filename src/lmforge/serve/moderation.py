"""Content moderation: the rule engine, the service the server asks, and `POST /v1/moderations`.

This file owns how text is checked against the registry's moderation rules (SQL lives in
`registry/moderation.py`; `lmforge moderation …` edits the rules) and the OpenAI-compatible
moderation route. No model is involved: verdicts come from rules, so they are fast,
deterministic and explainable (each names the rules that matched).

* `Moderator.from_ruleset(ruleset)` compiles one ruleset version once. Rule kinds are a small
  registry, `RULE_KINDS` (`word`, `regex`). Word rules match whole words, case-insensitively
  (Unicode case folding, after NFKC normalisation, so `ＩＤＩＯＴ` and `Idiot` both match
  `idiot`); a word's spaces match any run of whitespace. Scripts written without spaces (Chinese,
  Japanese, Thai, …, and Korean, whose words take particles) have no word boundaries, so a word
  that starts or ends in one matches inside longer text on that side. Regex rules are searched
  with `re.IGNORECASE` in the NFKC-normalised text. The PII rules of the data stage
  (`lmforge.data.pii`) run on the raw text and report `pii` plus `pii/<kind>` (`pii/email`, …).
* `Moderator.check(text)` returns a `ModerationResult`: OpenAI's thirteen categories (always
  present), `pii` and its kinds, and every category of the ruleset, each True when a rule of it
  matched (score 1.0) and False otherwise (0.0).
* `ModerationService(engine)` keeps the `Moderator` of the newest ruleset: each call reads the
  newest version (one indexed query) and recompiles when it changed, so a rule added with the CLI
  applies to the very next request of a running server. `verdict(...)` applies the policy of the
  key and model; blocking is the caller's decision, the service never raises for content.
* `router`: `POST /v1/moderations` with OpenAI's request and response shapes; the service comes
  from `app.state.moderation` through the `Moderation` dependency (the generation routes take
  it the same way). Authentication and metering are wired around it by the app.

Speed: 32 inputs of 32,000 characters against 270 word rules, 30 regex rules and the PII rules
take ~0.3 s on one core (`check` ~10 ms each, mostly the regexes: each is one scan).

The response's `model` is the ruleset id, `lmforge-rules-<version>+pii-<PII_RULES_VERSION>`.
Regex rules come from admins and are trusted: a catastrophically backtracking one slows every
request down, so keep them simple.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal, cast

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict
from sqlalchemy import Engine

from lmforge.data.pii import PII_RULES_VERSION, RULES, find_pii, rule_kinds
from lmforge.errors import LmforgeError
from lmforge.registry.moderation import (
    Policy,
    Rule,
    Ruleset,
    effective_policy,
    get_ruleset,
    latest_version,
)
from lmforge.serve.errors import OpenAIError, bad_request

log = logging.getLogger(__name__)

# OpenAI's moderation categories (https://platform.openai.com/docs/api-reference/moderations).
OPENAI_CATEGORIES: tuple[str, ...] = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
PII_CATEGORY = "pii"
PII_CATEGORIES: tuple[str, ...] = (PII_CATEGORY, *(f"pii/{kind}" for kind in rule_kinds()))

# OpenAI's limits for one request (inputs per request, characters per input).
MAX_INPUTS = 32
MAX_INPUT_CHARS = 32_000

Action = Literal["off", "flag", "block"]
Direction = Literal["input", "output"]


def ruleset_id(version: int) -> str:
    """The name of the rules a verdict was made under: `lmforge-rules-3+pii-1`."""
    return f"lmforge-rules-{version}+pii-{PII_RULES_VERSION}"


# -- rule kinds ----------------------------------------------------------------------------------

# Scripts written without spaces between words (Thai, Lao, Myanmar, Khmer, kana, CJK ideographs,
# Hangul syllables): no word boundary exists inside them.
_NO_SPACE_SCRIPTS = (
    "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f"
)
# A character that continues a word: a word character of a script written with spaces.
_WORD_CHAR = rf"[^\W{_NO_SPACE_SCRIPTS}]"
_WORD_CHAR_RE = re.compile(_WORD_CHAR)


def normalize(text: str) -> str:
    """What word rules match against: NFKC (full-width → ASCII, ligatures split), case-folded."""
    return unicodedata.normalize("NFKC", text).casefold()


@dataclass(frozen=True)
class Matcher:
    """How to find one rule in a text, as its kind compiles it."""

    pattern: re.Pattern[str]  # the rule itself
    folded: bool  # searched in the NFKC + case-folded text (else in the NFKC text)
    token: str | None = None  # a single word: found by a set lookup of the text's words instead
    needle: str | None = None  # a substring of every match: `pattern` runs only if it is there


# A word of a spaced script, as word rules see them (maximal runs of `_WORD_CHAR`).
_TOKEN = re.compile(rf"{_WORD_CHAR}+")


def compile_word(word: str) -> Matcher:
    """Match WORD as a whole word, case-insensitively, in `normalize`d text.

    A side gets a boundary only if the word's character there is a word character of a spaced
    script, so `kill` does not match `skills`, `坏蛋` matches `你这个坏蛋啊`, and `c++` matches
    `c++,`. A plain single word is a `token`: one set lookup against the text's words, however
    many such rules there are (an alternation of hundreds of words is ~10x slower).
    """
    parts = normalize(word).split()
    if not parts:
        raise LmforgeError(f"empty word pattern {word!r}")
    source = r"\s+".join(re.escape(part) for part in parts)
    if _WORD_CHAR_RE.match(parts[0][0]):
        source = rf"(?<!{_WORD_CHAR}){source}"
    if _WORD_CHAR_RE.match(parts[-1][-1]):
        source = rf"{source}(?!{_WORD_CHAR})"
    token = parts[0] if len(parts) == 1 and _TOKEN.fullmatch(parts[0]) else None
    return Matcher(re.compile(source), folded=True, token=token, needle=parts[0])


def compile_regex(pattern: str) -> Matcher:
    """Search PATTERN as written, with `re.IGNORECASE`, in the NFKC-normalised text."""
    return Matcher(re.compile(pattern, re.IGNORECASE), folded=False)


RULE_KINDS: dict[str, Callable[[str], Matcher]] = {"word": compile_word, "regex": compile_regex}
"""The registry of rule kinds: kind → compiler of a stored pattern (the registry's
`RULE_KINDS` must list the same kinds)."""


# -- the rule engine -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModerationResult:
    """The verdict on one text."""

    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]  # 1.0 matched, 0.0 not: rules have no degrees
    matched: list[tuple[str, str]] = field(default_factory=list)  # (category, which rule)

    @property
    def flagged_categories(self) -> list[str]:
        return [category for category, hit in self.categories.items() if hit]


@dataclass(frozen=True)
class _Check:
    """One rule, compiled: the category it reports, how to describe it, how to find it."""

    category: str
    description: str
    matcher: Matcher


class Moderator:
    """The compiled rules of one ruleset version plus the PII rules; immutable, thread-safe."""

    def __init__(self, version: int, checks: Sequence[_Check], categories: Sequence[str]) -> None:
        self.version = version
        self.ruleset_id = ruleset_id(version)
        self.categories: tuple[str, ...] = tuple(categories)
        self._checks = tuple(checks)
        self._by_token: dict[str, list[int]] = {}
        self._scanned: list[int] = []
        for i, check in enumerate(self._checks):
            if check.matcher.token is not None:
                self._by_token.setdefault(check.matcher.token, []).append(i)
            else:
                self._scanned.append(i)

    @classmethod
    def from_ruleset(cls, ruleset: Ruleset) -> Moderator:
        checks = [_compile(rule) for rule in ruleset.rules]
        categories = dict.fromkeys([*OPENAI_CATEGORIES, *PII_CATEGORIES])
        categories.update(dict.fromkeys(sorted(rule.category for rule in ruleset.rules)))
        return cls(ruleset.version, checks, list(categories))

    def check(self, text: str) -> ModerationResult:
        nfkc = unicodedata.normalize("NFKC", text)
        folded = nfkc.casefold()
        hits: list[int] = []
        if self._by_token:
            for token in self._by_token.keys() & set(_TOKEN.findall(folded)):
                hits += self._by_token[token]
        for i in self._scanned:
            matcher = self._checks[i].matcher
            haystack = folded if matcher.folded else nfkc
            if (matcher.needle is None or matcher.needle in haystack) and matcher.pattern.search(
                haystack
            ):
                hits.append(i)
        matched = [(self._checks[i].category, self._checks[i].description) for i in sorted(hits)]
        seen_pii: set[str] = set()
        for match in find_pii(text):
            if match.rule not in seen_pii:
                seen_pii.add(match.rule)
                matched.append((f"pii/{match.kind}", f"pii rule {match.rule}: {_PII[match.rule]}"))
        found = {category for category, _ in matched}
        if seen_pii:
            found.add(PII_CATEGORY)
        categories = {category: category in found for category in self.categories}
        return ModerationResult(
            flagged=bool(found),
            categories=categories,
            category_scores={category: float(hit) for category, hit in categories.items()},
            matched=matched,
        )


_PII = {rule.name: rule.description for rule in RULES}


def _compile(rule: Rule) -> _Check:
    try:
        matcher = RULE_KINDS[rule.kind](rule.pattern)
    except (KeyError, re.error) as e:  # the registry validates; this guards hand-edited rows
        raise LmforgeError(f"moderation rule {rule.id} ({rule.kind} {rule.pattern!r}): {e}") from e
    return _Check(rule.category, f"rule {rule.id}: {rule.kind} '{rule.pattern}'", matcher)


# -- the service ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What moderation says about one direction of one request under the applicable policy."""

    action: Action  # the policy's action for this direction
    flagged: bool  # some rule matched (always False when the action is "off": nothing ran)
    categories: list[str]  # the flagged categories, over all texts
    ruleset_id: str

    @property
    def blocked(self) -> bool:
        """Whether the caller should refuse the request (or withhold the answer)."""
        return self.action == "block" and self.flagged


class ModerationService:
    """Moderation for a running server: the newest ruleset, compiled once per version.

    Thread-safe: routes call it from the threadpool. The caller owns ENGINE.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._moderator: Moderator | None = None

    def moderator(self) -> Moderator:
        """The `Moderator` of the newest ruleset, recompiled when the version changed."""
        with self._engine.connect() as conn:
            version = latest_version(conn)
            cached = self._moderator
            if cached is not None and cached.version == version:
                return cached
            with self._lock:
                cached = self._moderator
                if cached is not None and cached.version == version:
                    return cached
                ruleset = get_ruleset(conn, version=version)
                assert ruleset is not None  # read in the same transaction as the version
                moderator = Moderator.from_ruleset(ruleset)
                if cached is None or cached.version < version:
                    self._moderator = moderator
        log.info("moderation: compiled %s (%d rules)", moderator.ruleset_id, len(ruleset.rules))
        return moderator

    def moderate(self, texts: Sequence[str]) -> tuple[str, list[ModerationResult]]:
        """Check each of TEXTS; return the ruleset id and one result per text."""
        moderator = self.moderator()
        return moderator.ruleset_id, [moderator.check(text) for text in texts]

    def policy(self, key_name: str | None, model: str | None) -> Policy:
        """The policy for requests by key KEY_NAME to MODEL (key beats model beats default)."""
        with self._engine.connect() as conn:
            return effective_policy(conn, key=key_name, model=model)

    def verdict(
        self,
        key_name: str | None,
        model: str | None,
        texts: Sequence[str],
        direction: Direction = "input",
    ) -> Verdict:
        """Apply the policy of KEY_NAME and MODEL for DIRECTION to TEXTS (nothing runs if off)."""
        if direction not in ("input", "output"):
            raise LmforgeError(f"direction must be 'input' or 'output', got {direction!r}")
        policy = self.policy(key_name, model)
        action = cast(Action, policy.input if direction == "input" else policy.output)
        if action == "off":
            with self._engine.connect() as conn:
                return Verdict("off", False, [], ruleset_id(latest_version(conn)))
        rules_id, results = self.moderate(texts)
        flagged = dict.fromkeys(c for result in results for c in result.flagged_categories)
        if flagged:
            log.info("moderation: %s %s flagged %s (%s)", direction, model, list(flagged), action)
        return Verdict(action, bool(flagged), list(flagged), rules_id)


# -- the route -----------------------------------------------------------------------------------


class ModerationRequest(BaseModel):
    """OpenAI's `POST /v1/moderations` body (text only). `model` is accepted and ignored: the
    rules in force decide, and the response names them."""

    model_config = ConfigDict(strict=True, extra="forbid")
    input: str | list[str]
    model: str | None = None


class ModerationItem(BaseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[str]]


class ModerationResponse(BaseModel):
    id: str
    model: str
    results: list[ModerationItem]


def moderation_service(http: Request) -> ModerationService:
    """The app's `ModerationService` (a FastAPI dependency: routes take it as `Moderation`);
    503 when the app has none."""
    service: ModerationService | None = getattr(http.app.state, "moderation", None)
    if service is None:
        raise OpenAIError(503, "moderation is not configured on this server")
    return service


Moderation = Annotated[ModerationService, Depends(moderation_service)]


router = APIRouter()


@router.post("/v1/moderations", response_model=ModerationResponse)
def create_moderation(body: ModerationRequest, service: Moderation) -> ModerationResponse:
    """Check each input against the moderation rules in force (sync: runs in the threadpool)."""
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not 1 <= len(texts) <= MAX_INPUTS:
        raise bad_request(f"input must hold 1 to {MAX_INPUTS} strings, got {len(texts)}", "input")
    for i, text in enumerate(texts):
        if len(text) > MAX_INPUT_CHARS:
            where = "input" if isinstance(body.input, str) else f"input[{i}]"
            raise bad_request(
                f"{where} is {len(text):,} characters long; at most {MAX_INPUT_CHARS:,}", "input"
            )
    rules_id, results = service.moderate(texts)
    return ModerationResponse(
        id=f"modr-{secrets.token_hex(16)}",
        model=rules_id,
        results=[
            ModerationItem(
                flagged=result.flagged,
                categories=result.categories,
                category_scores=result.category_scores,
                category_applied_input_types={category: ["text"] for category in result.categories},
            )
            for result in results
        ],
    )
