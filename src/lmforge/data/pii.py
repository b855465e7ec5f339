"""PII detection: a versioned registry of rules and the scanner that applies them.

This file owns what counts as personally identifiable information (PII) and how it is found. The
data stage uses it to scrub documents (`--pii scrub|drop|keep`); request-time moderation will use
the same registry, so everything here is pure stdlib (`re`, `ipaddress`), immutable once imported,
and safe to share between threads and to pickle into worker processes.

* `RULES` is the built-in registry, one `PiiRule` per shape of PII (a compiled regex, an optional
  checksum-style validator, an optional context veto). Rules share a `kind`, whose placeholder
  replaces them: `email <EMAIL>`, `phone <PHONE>`, `ip_address <IP_ADDRESS>`,
  `credit_card <CREDIT_CARD>`, `iban <IBAN>`, `ssn <SSN>`, `id_number <ID_NUMBER>` and
  `secret <SECRET>`. `rule_names()` and `rule_kinds()` list them.
* `PiiScanner(rules=None | names)` selects rules by name or kind (or takes extra `PiiRule`s);
  `find`, `scrub` and `contains` apply them. `find_pii`, `scrub` and `contains_pii` use a
  cached default scanner. The checksums (`luhn_valid`, `iban_valid`, `cn_id_valid`, …) are
  public too.
* `PII_RULES_VERSION` goes into data-set manifests: change what any rule matches → bump it.

Matching semantics, in the order they apply:

1. Boundaries. ASCII letters and digits are "word" characters; everything else, CJK included,
   is a boundary, so `请联系13812345678或` and `身份证号11010519491231002X` match. (`\\b` is never
   used: in Python's `re` CJK characters are `\\w`, so there is no `\\b` between 号 and a digit.)
   Each pattern starts with a single character class and checks the preceding character with a
   lookbehind placed *after* it, which keeps `re`'s fast first-character scan.
2. Validation. A candidate is kept only if its validator accepts it (Luhn, IBAN mod-97, ISO 7064
   MOD 11-2, SSN area/group/serial, `ipaddress`, digit counts, token entropy) and no veto pattern
   matches the 32 characters before it (`version 1.2.3.4`, `order no. 4111…`).
3. Overlaps. Candidates of all rules are ordered by start, then longest first, then registry
   order; each is kept unless it overlaps one kept before it (leftmost-longest, like a lexer).
   So `13812345678@qq.com` is one email, `+86 138 1234 5678` one phone, and a key inside a PEM
   block is part of the block.

Deliberate choices, precision first:

* A bare dotted quad such as `1.2.3.4` whose octets are all ≤ 255 *is* an IP address, unless a
  version or numbering word comes right before it (version, v, build, release, rev, firmware,
  section, chapter, §, 版本, 第…). `10.0.19041.1` (an octet > 255), `1.2.3` and `1.2.3.4.5` never
  are; neither are octets with leading zeros, which `ipaddress` rejects.
* Card numbers must start with 2-6 (the issuer ranges in use) and 18-digit runs are left to the
  Chinese ID rule. Cards and phone numbers right after "order no.", "tracking #", 订单号, 运单号
  and the like are references, not PII.
* NANP numbers need a valid area code and exchange ([2-9]XX), so `555-123-4567` is not one;
  China's landlines (010-12345678) are not covered, only mobiles and `+86` numbers.
* Hex hashes, git SHAs and UUIDs are not secrets. A long random-looking value is a secret only
  after a `key=` / `token:` / `secret=` / `password=`-style name or `Bearer `, and only that
  value is replaced; provider keys (sk-, AKIA, ghp_, xoxb-, AIza, sk_live_) need no name.
* Only ASCII digits and ASCII e-mail addresses count (full-width １３８… is not matched).

Speed (scrubbing ~20 MB of generated text in ~4 KB documents, one core of a loaded 2-core
container, CPython 3.11, UTF-8 bytes): PII-free English prose 40-60 MB/s, Chinese prose 60-105
MB/s; English with a date or long number in every sentence ~15 MB/s. Two things make it fast:
every pattern starts with a literal or one character class, so `re` skips ahead in C, and the
slow patterns only run near the hits of a cheap prefilter (an `@`, a dotted number, a run of
nine digits). Repeats are bounded or possessive, so scans stay linear on adversarial input
(runs of digits, colons, `@`, BEGIN lines…), which matters for request-time moderation.

The file is longer than most because the registry is data: twenty rules, their validators and
their patterns read best side by side.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Protocol

from lmforge.errors import LmforgeError

PII_RULES_VERSION = "1"

# How far before a candidate a rule's `veto_before` pattern looks.
_VETO_WINDOW = 32
# How far past a prefilter window a rule's pattern may look (its lookaheads are shorter).
_WINDOW_MARGIN = 8
# Prefilter windows closer than this are searched as one.
_MERGE_GAP = 256


class Prefilter(Protocol):
    """What a rule's prefilter must do: find its (cheap) hits. A compiled regex qualifies."""

    def finditer(self, text: str, /) -> Iterator[re.Match[str]]: ...


@dataclass(frozen=True)
class PiiRule:
    """One shape of PII: where it is (`pattern`), whether it is real (`validate`), what replaces it.

    `group` names the regex group that is the PII (0: the whole match); `validate` receives that
    group's text. `veto_before`, if set, is searched in the text just before a candidate and
    rejects it when it matches (it should end in `\\Z`).

    `prefilter`, if set, is a cheap pattern that every match of the rule contains; `pattern` is
    then searched only within `reach` characters of a prefilter hit (the whole text if `reach`
    is None and there is any hit). Rules sharing a prefilter share its scan.
    """

    name: str
    kind: str
    placeholder: str
    pattern: re.Pattern[str]
    description: str
    validate: Callable[[str], bool] | None = None
    group: int | str = 0
    veto_before: re.Pattern[str] | None = None
    prefilter: Prefilter | None = None
    reach: int | None = None


@dataclass(frozen=True)
class PiiMatch:
    """A found span `text[start:end]` and the rule (and its kind) that found it."""

    rule: str
    kind: str
    start: int
    end: int


# --------------------------------------------------------------------------------------------
# validators (public: they are useful, and tested, on their own)
# --------------------------------------------------------------------------------------------


def _digits(text: str) -> str:
    return "".join(c for c in text if "0" <= c <= "9")


def luhn_valid(number: str) -> bool:
    """Luhn (mod 10) check over the ASCII digits of `number`; separators are ignored."""
    digits = _digits(number)
    if len(digits) < 2:
        return False
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = ord(c) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_valid(text: str) -> bool:
    digits = _digits(text)
    return 13 <= len(digits) <= 19 and len(digits) != 18 and luhn_valid(digits)


# IBAN length per country, from the SWIFT IBAN registry
# (https://www.swift.com/standards/data-standards/iban-international-bank-account-number).
_IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip


def iban_valid(text: str) -> bool:
    """ISO 13616: known country, that country's length, check digits 02-98, mod 97 == 1."""
    iban = text.replace(" ", "").upper()
    if _IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban.isascii() or not iban.isalnum():
        return False
    if not iban[2:4].isdigit() or not 2 <= int(iban[2:4]) <= 98:
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


# First two digits of a mainland-China resident ID: province-level region codes (GB/T 2260),
# plus 71 Taiwan, 81 Hong Kong, 82 Macao, 83 (residence permits for Taiwan residents).
_CN_PROVINCES = frozenset(
    {"11", "12", "13", "14", "15", "21", "22", "23", "31", "32", "33", "34", "35", "36", "37",
     "41", "42", "43", "44", "45", "46", "50", "51", "52", "53", "54", "61", "62", "63", "64",
     "65", "71", "81", "82", "83"}
)  # fmt: skip
_CN_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def cn_id_check_char(first17: str) -> str:
    """The ISO 7064 MOD 11-2 check character (0-9 or X) of a Chinese ID's first 17 digits."""
    total = sum(int(c) * w for c, w in zip(first17, _CN_ID_WEIGHTS, strict=True))
    return "10X98765432"[total % 11]


def cn_id_valid(text: str) -> bool:
    """GB 11643 resident ID: province code, a real birth date 1900-2099, MOD 11-2 check char."""
    if len(text) != 18 or not text[:17].isdigit() or not text[:17].isascii():
        return False
    if text[:2] not in _CN_PROVINCES:
        return False
    year, month, day = int(text[6:10]), int(text[10:12]), int(text[12:14])
    if not 1900 <= year <= 2099:
        return False
    try:
        date(year, month, day)
    except ValueError:
        return False
    return cn_id_check_char(text[:17]) == text[17].upper()


def ssn_valid(text: str) -> bool:
    """US SSN AAA-GG-SSSS: area not 000, 666 or 900-999; group not 00; serial not 0000."""
    parts = text.split("-")
    if [len(p) for p in parts] != [3, 2, 4] or not all(p.isascii() and p.isdigit() for p in parts):
        return False
    area, group, serial = parts
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def ipv4_valid(text: str) -> bool:
    """Dotted quad with octets 0-255 and no leading zeros (as `ipaddress` parses it)."""
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def ipv6_valid(text: str) -> bool:
    """An `ipaddress`-valid IPv6 address with at least two colons and one hex digit (not `::`)."""
    if text.count(":") < 2 or text.strip(":") == "":
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _phone_digits_valid(text: str) -> bool:
    # E.164 allows at most 15 digits; fewer than 9 is a short code, a quantity or a year.
    return 9 <= len(_digits(text)) <= 15


def _shannon_bits(text: str) -> float:
    n = len(text)
    return -sum(k / n * math.log2(k / n) for k in Counter(text).values())


def _looks_random(text: str, min_len: int = 20) -> bool:
    """A secret-looking value: long, letters and digits mixed, ≥ 3 bits of entropy per char, and
    ≥ 4 switches between digits, small and capital letters, punctuation aside (so neither
    `understanding2024things` nor `learn-compatible-pipeline-v2` is random)."""
    if len(text) < min_len or not any(c.isdigit() for c in text):
        return False
    if not any(c.isalpha() for c in text) or _shannon_bits(text) < 3.0:
        return False
    classes = [0 if c.isdigit() else 1 if c.islower() else 2 for c in text if c.isalnum()]
    return sum(a != b for a, b in itertools.pairwise(classes)) >= 4


def _openai_key_valid(text: str) -> bool:
    return _looks_random(text[3:])


# Image and web-asset extensions: `logo@2x.png` is a file name, not an address.
_NOT_TLDS = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "bmp", "ico", "css", "js"})


def _email_valid(text: str) -> bool:
    return text.rsplit(".", 1)[1].lower() not in _NOT_TLDS


def _has_digit(text: str) -> bool:
    return any(c.isdigit() for c in text)


# --------------------------------------------------------------------------------------------
# patterns
# --------------------------------------------------------------------------------------------

_ALNUM = "0-9A-Za-z"


def _lead(first: str, not_after: str) -> str:
    """`first` (a class or a literal) where the character before it is not in `[not_after]`.

    The lookbehind comes after `first` so that `first` is the pattern's first operation and
    `re` scans for it in C instead of trying the whole pattern at every position.
    """
    return f"{first}(?<![{not_after}]{first})"


# Prefilters: cheap patterns (most start with a literal, which `re` finds with a tight loop) that
# must occur in a text for the slower rules behind them to run. Each is searched once per text.
_GATE_AT = re.compile("@")
_GATE_DOTTED = re.compile(r"\.[0-9]{1,3}\.[0-9]")
_GATE_COLONS = re.compile(r":(?::|[0-9A-Fa-f]{1,4}:)")
_GATE_STRIPE = re.compile(r"k_(?:live|test)_")


class _DigitRunGate:
    """Runs of nine digits with at most two separators between neighbours.

    Every card, SSN, NANP number, Chinese ID and IBAN (all registered formats have nine digits
    together once the check digits are counted) has one; prose, dates (eight digits) and most
    plain numbers have not. Scanning for a digit costs `re` ~10 ns a character, so a bytes-level
    test comes first: with the separators deleted, the UTF-8 text must have nine digits in a row.
    """

    _RUN = re.compile(r"[0-9](?:[-. ()]{0,2}[0-9]){8}")
    _DIGITS_TO_ZERO = bytes(0x30 if 0x30 <= b <= 0x39 else b for b in range(256))

    def finditer(self, text: str, /) -> Iterator[re.Match[str]]:
        raw = text.encode("utf-8", "surrogatepass")
        if b"000000000" not in raw.translate(self._DIGITS_TO_ZERO, b"-. ()"):
            return iter(())
        return self._RUN.finditer(text)


_GATE_DIGITS = _DigitRunGate()

# Context that turns a dotted quad into a version or section number, and numbers into references.
_VERSION_CONTEXT = re.compile(
    r"(?:(?<![A-Za-z])(?i:version|ver|v|build|release|rev|revision|firmware|fw|section|sec"
    r"|chapter|clause|figure|fig|table|step|item|paragraph|para|article|rule)\.?"
    r"|§|版本号?|内部版本号?|章节|条款|第)[ \t]*[:：=#]?[ \t]*\Z"
)
_REFERENCE_CONTEXT = re.compile(
    r"(?:(?<![A-Za-z])(?i:order|tracking|invoice|ticket|ref|reference|isbn|sku|serial|part)"
    r"(?i:[ \t]*(?:no\.?|number|num|id|code))?"
    r"|订单号?|运单号?|快递单号|单号|发票号码?|编号|序列号|流水号)"
    r"[ \t]*[:：#=]?[ \t]*#?\Z"
)

_EMAIL = re.compile(
    _lead("[A-Za-z0-9]", r"A-Za-z0-9._%+\-") + r"[A-Za-z0-9._%+\-]{0,63}@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![A-Za-z0-9\-])"
)

# +CC then digit groups split by one space, dash or dot, with at most one (area) group:
# +44 20 7946 0958, +1-415-555-0132, +44 (0)20 7946 0958, +8613812345678.
_PHONE_INTL = re.compile(
    _lead(r"\+", _ALNUM + "+") + r"[1-9][0-9]*+(?:[-. ]?\([0-9]{1,4}\))?(?:[-. ]?[0-9]++){0,6}"
    r"(?![0-9A-Za-z])"
)
# Mainland-China mobile: 1[3-9]X XXXX XXXX, with two equal separators or none (so that
# `1777283 1994`, a number and a year, is not one).
_PHONE_CN = re.compile(
    _lead("1", _ALNUM) + r"[3-9][0-9](?:[0-9]{8}|(?P<sep>[- ])[0-9]{4}(?P=sep)[0-9]{4})"
    r"(?![0-9A-Za-z])"
)
# NANP: (415) 555-0132, 415-555-0132, 415.555.0132, 415 555 0132, 1-800-555-0199.
_PHONE_NANP = re.compile(
    _lead("[(0-9]", _ALNUM + "(") + r"(?<![0-9][-.][(0-9])"
    r"(?:(?<=\()[2-9][0-9]{2}\)[ ]?|(?<=1)[-. ][2-9][0-9]{2}[-. ]|(?<=[2-9])[0-9]{2}[-. ])"
    r"[2-9][0-9]{2}[-. ][0-9]{4}(?![0-9A-Za-z])(?![-.][0-9])"
)

_IPV4 = re.compile(
    _lead("[0-9]", _ALNUM + ".") + r"[0-9]{0,2}(?:\.[0-9]{1,3}){3}(?![0-9A-Za-z])(?!\.[0-9])"
)
# Loose shape (the first colon within five characters, optional dotted-quad tail);
# `ipaddress` decides.
_IPV6 = re.compile(
    _lead("[0-9A-Fa-f:]", _ALNUM + ":.") + r"(?:(?<=:)|[0-9A-Fa-f]{0,3}:)[0-9A-Fa-f:]{1,37}"
    r"(?:(?:\.[0-9]{1,3}){3})?(?![0-9A-Za-z:])"
)

# 13-19 digits in one run, or grouped 4-4-4-4(-3) with one kind of separator, or 4-6-5 / 4-6-4.
_CREDIT_CARD = re.compile(
    _lead("[2-6]", _ALNUM) + r"(?<![0-9][-. ][2-6])"
    r"(?:[0-9]{12,18}"
    r"|[0-9]{3}(?P<sep>[ \-])[0-9]{4}(?P=sep)[0-9]{4}(?P=sep)[0-9]{4}(?:(?P=sep)[0-9]{3})?"
    r"|[0-9]{3}[ \-][0-9]{6}[ \-][0-9]{4,5})"
    r"(?![0-9A-Za-z])(?![ \-][0-9])"
)

_SSN = re.compile(
    _lead("[0-9]", _ALNUM) + r"(?<![0-9][-. ][0-9])[0-9]{2}-[0-9]{2}-[0-9]{4}"
    r"(?![0-9A-Za-z])(?!-[0-9])"
)

_CN_ID = re.compile(_lead("[1-9]", _ALNUM) + r"[0-9]{16}[0-9Xx](?![0-9A-Za-z])")


def _iban_pattern() -> re.Pattern[str]:
    """Country code, check digits, then exactly that country's BBAN length in groups of four
    (spaces optional), so a following `EUR` or `2024` is never swallowed."""
    by_length: dict[int, list[str]] = {}
    for country, length in _IBAN_LENGTHS.items():
        by_length.setdefault(length, []).append(country)
    branches = []
    for length, countries in sorted(by_length.items(), reverse=True):
        full, rest = divmod(length - 4, 4)
        bban = f"(?: ?[0-9A-Z]{{4}}){{{full}}}" + (f" ?[0-9A-Z]{{{rest}}}" if rest else "")
        branches.append(f"(?<=(?:{'|'.join(sorted(countries))})[0-9]{{2}}){bban}")
    return re.compile(
        _lead("[A-Z]", _ALNUM) + "[A-Z][0-9]{2}(?:" + "|".join(branches) + ")(?![0-9A-Za-z])"
    )


# A newline, or the two characters `\n` of a key pasted into a JSON or .env string.
_NEWLINE = r"(?:\r?\n|(?:\\r)?\\n)"
_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"
    # The whole block: base64, headers (Proc-Type: 4,ENCRYPTED) and any whitespace, even all
    # on one line; the body cannot run past another "-----", so a scan is linear.
    r"(?:(?:[A-Za-z0-9+/=:,\s]|\\[rn]|-(?!----)){0,20000}+-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----"
    # Or, with no END line (a truncated paste), the header and base64 lines that follow: whole
    # lines, or base64-looking runs (16+ characters, not only letters) where the text goes on.
    rf"|(?:{_NEWLINE}[ \t]*+(?:[A-Za-z][A-Za-z\-]{{0,31}}: [^\r\n\\]*+"
    r"|(?=[A-Za-z0-9+/=]{16})(?=[A-Za-z=]*+[0-9+/])[A-Za-z0-9+/=]++"
    rf"|[A-Za-z0-9+/=]++(?={_NEWLINE}|\Z)))*+)"
)
_OPENAI_KEY = re.compile(_lead("sk-", r"0-9A-Za-z_\-") + r"[A-Za-z0-9_\-]{20,}+")
_AWS_KEY_ID = re.compile(_lead("AKIA", _ALNUM) + r"[0-9A-Z]{16}(?![0-9A-Za-z])")
_GITHUB_TOKEN = re.compile(
    _lead("g", _ALNUM + "_") + r"(?:h[pousr]_[A-Za-z0-9]{36,251}|ithub_pat_[A-Za-z0-9_]{22,255})"
    r"(?![A-Za-z0-9_])"
)
_SLACK_TOKEN = re.compile(_lead("xox", _ALNUM) + r"[abposr]-[0-9A-Za-z\-]{10,250}+")
_GOOGLE_KEY = re.compile(_lead("AIza", _ALNUM) + r"[0-9A-Za-z_\-]{35}(?![0-9A-Za-z_\-])")
_STRIPE_KEY = re.compile(
    _lead("[rs]", _ALNUM + "_") + r"k_(?:live|test)_[0-9A-Za-z]{16,247}(?![0-9A-Za-z])"
)

# `Authorization: Bearer <token>`; the literal prefix keeps the scan fast, the lookbehinds
# check the capital or small b and that the word starts there.
_BEARER_TOKEN = re.compile(
    r"earer(?<=[Bb]earer)(?<![A-Za-z0-9][Bb]earer)[ \t]+"
    r"(?P<value>[A-Za-z0-9+/_~\-]++(?:\.[A-Za-z0-9+/_~\-]++)*+={0,2})"
)

_SECRET_NAMES = ("key", "token", "secret", "password", "passwd", "pwd", "credentials")


def _secret_value_pattern(delimiter: str) -> re.Pattern[str]:
    """`name<delimiter> value` where the name ends in a secret word; the value is group `value`.

    The pattern starts at the delimiter (`=` or `:`, a literal, so `re` finds candidates with a
    tight loop) and looks back for the name with one fixed-width lookbehind per (word, closing
    quote or space) pair: `api_key=…`, `"password": "…"`, `AWS_SECRET_ACCESS_KEY = …`.
    """
    behind = "|".join(
        f"(?<={re.escape(word + tail + delimiter)})"
        for word in _SECRET_NAMES
        for tail in ("", '"', "'", " ", '" ', "' ", "\t")
    )
    return re.compile(
        rf"{re.escape(delimiter)}(?i:{behind})[ \t]*[\"']?"
        r"(?P<value>[A-Za-z0-9+/_~\-]++(?:\.[A-Za-z0-9+/_~\-]++)*+={0,2})"
    )


def _rule(
    name: str,
    kind: str,
    pattern: re.Pattern[str],
    description: str,
    *,
    validate: Callable[[str], bool] | None = None,
    group: int | str = 0,
    veto_before: re.Pattern[str] | None = None,
    prefilter: Prefilter | None = None,
    reach: int | None = None,
) -> PiiRule:
    """A built-in rule; its placeholder is its kind in capitals: `<PHONE>`."""
    return PiiRule(
        name=name,
        kind=kind,
        placeholder=f"<{kind.upper()}>",
        pattern=pattern,
        description=description,
        validate=validate,
        group=group,
        veto_before=veto_before,
        prefilter=prefilter,
        reach=reach,
    )


RULES: tuple[PiiRule, ...] = (
    _rule(
        "private_key", "secret", _PRIVATE_KEY,
        "PEM private-key block (RSA, EC, DSA, OPENSSH, ENCRYPTED…), BEGIN to END line.",
    ),
    _rule(
        "openai_key", "secret", _OPENAI_KEY,
        "OpenAI-style key sk-… / sk-proj-… (random-looking, ≥ 20 chars after sk-).",
        validate=_openai_key_valid,
    ),
    _rule("aws_access_key_id", "secret", _AWS_KEY_ID, "AWS access key id AKIA + 16 [0-9A-Z]."),
    _rule(
        "github_token", "secret", _GITHUB_TOKEN,
        "GitHub token ghp_/gho_/ghs_/ghu_/ghr_ + 36 chars, or github_pat_….",
    ),
    _rule(
        "slack_token", "secret", _SLACK_TOKEN, "Slack token xoxa-/xoxb-/xoxp-/xoxr-/xoxs-….",
        validate=_has_digit,
    ),
    _rule("google_api_key", "secret", _GOOGLE_KEY, "Google API key AIza + 35 chars."),
    _rule("stripe_key", "secret", _STRIPE_KEY, "Stripe secret/restricted key sk_/rk_ live/test.",
        prefilter=_GATE_STRIPE, reach=256,
    ),
    _rule(
        "secret_assignment", "secret", _secret_value_pattern("="),
        "The value in key=…/token=…/secret=…/password=… when it is long and random-looking.",
        validate=_looks_random, group="value",
    ),
    _rule(
        "secret_field", "secret", _secret_value_pattern(":"),
        "The value in key: …/\"token\": \"…\" (YAML, JSON, headers) when long and random-looking.",
        validate=_looks_random, group="value",
    ),
    _rule(
        "bearer_token", "secret", _BEARER_TOKEN,
        "The token after `Bearer ` (HTTP Authorization) when it is long and random-looking.",
        validate=_looks_random, group="value",
    ),
    _rule(
        "email", "email", _EMAIL,
        "E-mail address with an ASCII local part and domain (not logo@2x.png).",
        validate=_email_valid, prefilter=_GATE_AT, reach=320,
    ),
    _rule(
        "iban", "iban", _iban_pattern(),
        "IBAN, compact or in groups of four, with the country's length and mod-97 check.",
        validate=iban_valid, prefilter=_GATE_DIGITS, reach=48,
    ),
    _rule(
        "cn_id", "id_number", _CN_ID,
        "Mainland-China 18-character resident ID (region, birth date, MOD 11-2 check).",
        validate=cn_id_valid, prefilter=_GATE_DIGITS, reach=48,
    ),
    _rule(
        "credit_card", "credit_card", _CREDIT_CARD,
        "Payment card number starting 2-6, 13-19 digits (not 18), grouped or not, Luhn-valid.",
        validate=_card_valid, veto_before=_REFERENCE_CONTEXT, prefilter=_GATE_DIGITS, reach=48,
    ),
    _rule(
        "ssn", "ssn", _SSN, "US social security number AAA-GG-SSSS with valid area/group/serial.",
        validate=ssn_valid, prefilter=_GATE_DIGITS, reach=48,
    ),
    _rule(
        "phone_intl", "phone", _PHONE_INTL,
        "International number: + country code and 9-15 digits in groups.",
        validate=_phone_digits_valid,
    ),
    _rule(
        "phone_cn", "phone", _PHONE_CN,
        "Mainland-China mobile number 1[3-9]X XXXX XXXX (spaces or dashes optional).",
        veto_before=_REFERENCE_CONTEXT,
    ),
    _rule(
        "phone_nanp", "phone", _PHONE_NANP,
        "North-American number (415) 555-0132 / 415-555-0132 / 415.555.0132 / 1-800-….",
        veto_before=_REFERENCE_CONTEXT, prefilter=_GATE_DIGITS, reach=48,
    ),
    _rule(
        "ipv6", "ip_address", _IPV6, "IPv6 address, full or compressed (::), checked by ipaddress.",
        validate=ipv6_valid, prefilter=_GATE_COLONS, reach=48,
    ),
    _rule(
        "ipv4", "ip_address", _IPV4,
        "IPv4 dotted quad with octets ≤ 255, unless a version/build/section word precedes it.",
        validate=ipv4_valid, veto_before=_VERSION_CONTEXT, prefilter=_GATE_DOTTED, reach=16,
    ),
)  # fmt: skip

_BY_NAME: dict[str, PiiRule] = {rule.name: rule for rule in RULES}
_KINDS: tuple[str, ...] = tuple(dict.fromkeys(rule.kind for rule in RULES))


def rule_names() -> tuple[str, ...]:
    """Names of the built-in rules, in priority (registry) order."""
    return tuple(_BY_NAME)


def rule_kinds() -> tuple[str, ...]:
    """The kinds of PII the built-in rules find; each kind has one placeholder."""
    return _KINDS


# --------------------------------------------------------------------------------------------
# scanner
# --------------------------------------------------------------------------------------------


def _windows(rule: PiiRule, text: str, memo: dict[object, list[int]]) -> list[int]:
    """Flat [start, end, start, end, …] of the regions where `rule` can match, in order.

    `memo` keeps each prefilter's regions across the rules of one scan. Regions closer than
    `_MERGE_GAP` are merged: scanning a short gap costs less than one more `search` call.
    """
    gate, reach, n = rule.prefilter, rule.reach, len(text)
    if gate is None:
        return [0, n]
    key = (gate, reach)
    merged = memo.get(key)
    if merged is not None:
        return merged
    merged = []
    for m in gate.finditer(text):
        if reach is None:
            merged = [0, n]
            break
        start, end = max(0, m.start() - reach), min(n, m.end() + reach)
        if merged and start <= merged[-1] + _MERGE_GAP:
            merged[-1] = max(merged[-1], end)
        else:
            merged += (start, end)
    memo[key] = merged
    return merged


def _spans(rule: PiiRule, text: str, memo: dict[object, list[int]]) -> Iterator[tuple[int, int]]:
    """Validated, non-vetoed spans of one rule, left to right, non-overlapping."""
    search, validate, veto, group = rule.pattern.search, rule.validate, rule.veto_before, rule.group
    windows, n = _windows(rule, text, memo), len(text)
    for i in range(0, len(windows), 2):
        pos, window_end = windows[i], windows[i + 1]
        # Search a little past the window so lookaheads see real text; a match running into
        # that margin may have been cut short by it, so it is left out (a true match lies
        # inside the window by the choice of `reach`).
        endpos = min(n, window_end + _WINDOW_MARGIN)
        while (m := search(text, pos, endpos)) is not None:
            start, end = m.span(group)
            if (
                (m.end() <= window_end or endpos == n)
                and (validate is None or validate(text[start:end]))
                and (veto is None or veto.search(text, max(0, start - _VETO_WINDOW), start) is None)
            ):
                yield start, end
                pos = m.end()
            else:  # a rejected candidate may hide a valid one that starts inside it
                pos = m.start() + 1


class PiiScanner:
    """Finds and scrubs PII with a selection of rules; immutable, so safe to share and pickle.

    `rules`: None for all of `RULES`; otherwise names of built-in rules (`"email"`, `"phone_cn"`)
    or kinds (`"phone"`, `"secret"`), which keep registry order, and `PiiRule` objects, which
    come after them in the order given. Order breaks ties between overlapping matches.
    """

    __slots__ = ("_placeholders", "_rules")

    def __init__(self, rules: Sequence[str | PiiRule] | None = None) -> None:
        if rules is None:
            selected = RULES
        else:
            if isinstance(rules, str):
                rules = [rules]
            wanted: set[str] = set()
            custom: list[PiiRule] = []
            for item in rules:
                if isinstance(item, PiiRule):
                    custom.append(item)
                elif item in _BY_NAME:
                    wanted.add(item)
                elif item in _KINDS:
                    wanted.update(r.name for r in RULES if r.kind == item)
                else:
                    raise LmforgeError(
                        f"unknown PII rule {item!r}; rules are {', '.join(_BY_NAME)} "
                        f"and kinds are {', '.join(_KINDS)}"
                    )
            selected = tuple(r for r in RULES if r.name in wanted) + tuple(custom)
        names = [r.name for r in selected]
        if len(set(names)) != len(names):
            raise LmforgeError(f"PII rule names must be unique, got {', '.join(names)}")
        self._rules: tuple[PiiRule, ...] = selected
        self._placeholders: dict[str, str] = {r.name: r.placeholder for r in selected}

    @property
    def rules(self) -> tuple[PiiRule, ...]:
        return self._rules

    @property
    def signature(self) -> str:
        """Rules version and selected rule names, for content keys: `1:email,phone_cn`."""
        return f"{PII_RULES_VERSION}:{','.join(r.name for r in self._rules)}"

    def find(self, text: str) -> list[PiiMatch]:
        """Non-overlapping matches sorted by start (leftmost, then longest, then rule order)."""
        candidates: list[tuple[int, int, int]] = []  # (start, -end, rule index)
        memo: dict[object, list[int]] = {}
        for index, rule in enumerate(self._rules):
            candidates.extend((start, -end, index) for start, end in _spans(rule, text, memo))
        candidates.sort()
        found: list[PiiMatch] = []
        kept_end = 0
        for start, neg_end, index in candidates:
            if start >= kept_end:
                rule = self._rules[index]
                found.append(PiiMatch(rule.name, rule.kind, start, -neg_end))
                kept_end = -neg_end
        return found

    def scrub(self, text: str) -> tuple[str, dict[str, int]]:
        """`text` with each match replaced by its rule's placeholder, and counts per rule name."""
        found = self.find(text)
        if not found:
            return text, {}
        parts: list[str] = []
        pos = 0
        for match in found:
            parts.append(text[pos : match.start])
            parts.append(self._placeholders[match.rule])
            pos = match.end
        parts.append(text[pos:])
        counts = Counter(match.rule for match in found)
        return "".join(parts), dict(sorted(counts.items()))

    def contains(self, text: str) -> bool:
        """Whether any rule matches; stops at the first validated match."""
        memo: dict[object, list[int]] = {}
        return any(next(_spans(rule, text, memo), None) is not None for rule in self._rules)

    def __repr__(self) -> str:
        return f"PiiScanner({self.signature!r})"


@functools.cache
def default_scanner() -> PiiScanner:
    """The scanner with every built-in rule, built on first use."""
    return PiiScanner()


def find_pii(text: str) -> list[PiiMatch]:
    """`default_scanner().find(text)`."""
    return default_scanner().find(text)


def scrub(text: str) -> tuple[str, dict[str, int]]:
    """`default_scanner().scrub(text)`."""
    return default_scanner().scrub(text)


def contains_pii(text: str) -> bool:
    """`default_scanner().contains(text)`."""
    return default_scanner().contains(text)
