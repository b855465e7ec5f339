"""Tests for `lmforge.data.pii`: validators, scanner semantics and a labelled synthetic corpus.

The corpus is generated with a fixed seed: every positive value is built algorithmically with a
correct checksum (Luhn, IBAN mod-97, ISO 7064 MOD 11-2) and planted in an English or Chinese
sentence; the negatives are the look-alikes that must not be flagged (versions, dates, ISBNs,
Luhn-failing cards, wrong-checksum IDs, hashes, UUIDs, timestamps…). Recall and precision are
computed over it and reported per kind, so a regression names the kind that broke.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import pickle
import random
import string
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta

import pytest

from lmforge.data import pii
from lmforge.errors import LmforgeError

SEED = 20240115

# --------------------------------------------------------------------------------------------
# reference checksums, written independently of the module
# --------------------------------------------------------------------------------------------


def luhn_check_digit(partial: str) -> str:
    """The digit that makes `partial + digit` pass Luhn (doubling every second from the right)."""
    total = 0
    for i, c in enumerate(reversed(partial)):
        d = int(c)
        if i % 2 == 0:  # these get doubled once the check digit is appended
            d = sum(divmod(d * 2, 10))
        total += d
    return str((10 - total % 10) % 10)


def naive_luhn(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    doubled = [sum(divmod(2 * d, 10)) if i % 2 else d for i, d in enumerate(reversed(digits))]
    return len(digits) > 1 and sum(doubled) % 10 == 0


def iban_check_digits(country: str, bban: str) -> str:
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    return f"{98 - int(numeric) % 97:02d}"


def cn_check_char(first17: str) -> str:
    weights = [2 ** (17 - i) % 11 for i in range(17)]  # ISO 7064 MOD 11-2 weights, derived
    remainder = (12 - sum(int(c) * w for c, w in zip(first17, weights, strict=True)) % 11) % 11
    return "X" if remainder == 10 else str(remainder)


# --------------------------------------------------------------------------------------------
# value generators: each returns (fragment, start, end) — the PII is fragment[start:end]
# --------------------------------------------------------------------------------------------

Planted = tuple[str, int, int]
ALNUM = string.ascii_letters + string.digits


def _d(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _token(rng: random.Random, n: int, alphabet: str = ALNUM) -> str:
    """Random token with at least one digit, lower and upper letter (as real keys have)."""
    while True:
        tok = "".join(rng.choice(alphabet) for _ in range(n))
        if (
            any(c.isdigit() for c in tok)
            and any(c.islower() for c in tok) == any(c.islower() for c in alphabet)
            and any(c.isupper() for c in tok) == any(c.isupper() for c in alphabet)
        ):
            return tok


def _whole(value: str) -> Planted:
    return value, 0, len(value)


def gen_email(rng: random.Random) -> Planted:
    first = rng.choice(["zhang", "wei", "john", "mary", "li.na", "oconnor", "dev-ops", "j_smith"])
    last = rng.choice(["wang", "smith", "garcia", "mueller", "chen", "x"])
    local = rng.choice(
        [first, f"{first}.{last}", f"{first}{rng.randint(1, 999)}", f"{first}+{last}"]
    )
    domain = rng.choice(
        ["example.com", "mail.example.co.uk", "qq.com", "163.com", "example.cn", "uni-bonn.de"]
    )
    return _whole(f"{local}@{domain}")


def _nanp_parts(rng: random.Random) -> tuple[str, str, str]:
    return f"{rng.randint(2, 9)}{_d(rng, 2)}", f"{rng.randint(2, 9)}{_d(rng, 2)}", _d(rng, 4)


def gen_phone(rng: random.Random) -> Planted:
    area, exch, line = _nanp_parts(rng)
    mobile = f"1{rng.randint(3, 9)}{_d(rng, 1)}"
    a, b = _d(rng, 4), _d(rng, 4)
    return _whole(
        rng.choice(
            [
                f"+44 20 {a} {b}",
                f"+1-{area}-{exch}-{line}",
                f"+49 30 {_d(rng, 6)}",
                f"+33 {rng.randint(1, 9)} {_d(rng, 2)} {_d(rng, 2)} {_d(rng, 2)} {_d(rng, 2)}",
                f"+81 3-{a}-{b}",
                f"+1 ({area}) {exch}-{line}",
                f"+44 (0)20 {a} {b}",
                f"+86 {mobile} {a} {b}",
                f"+86{mobile}{a}{b}",
                f"({area}) {exch}-{line}",
                f"{area}-{exch}-{line}",
                f"{area}.{exch}.{line}",
                f"1-800-{exch}-{line}",
                f"{mobile}{a}{b}",
                f"{mobile} {a} {b}",
                f"{mobile}-{a}-{b}",
            ]
        )
    )


def gen_ip(rng: random.Random) -> Planted:
    choice = rng.randrange(6)
    if choice < 2:
        return _whole(str(ipaddress.IPv4Address(rng.getrandbits(32))))
    if choice == 2:
        return _whole(ipaddress.IPv6Address(rng.getrandbits(128)).exploded)
    if choice == 3:  # a zero run, so that the compressed form has '::'
        groups = [rng.getrandbits(16) for _ in range(8)]
        start = rng.randrange(7)
        for i in range(start, start + rng.randint(2, 8 - start)):
            groups[i] = 0
        return _whole(ipaddress.IPv6Address(":".join(f"{g:x}" for g in groups)).compressed)
    if choice == 4:
        return _whole(rng.choice(["fe80::", "2001:db8::", "::"]) + f"{rng.getrandbits(16):x}")
    return _whole(f"::ffff:{ipaddress.IPv4Address(rng.getrandbits(32))}")


CARD_BRANDS = [  # (prefix, length)
    ("4", 16), ("4", 13), ("4", 19), ("51", 16), ("55", 16), ("2221", 16), ("2720", 16),
    ("34", 15), ("37", 15), ("6011", 16), ("65", 16), ("3530", 16), ("62", 16), ("62", 19),
    ("36", 14),
]  # fmt: skip


def card_number(rng: random.Random) -> str:
    prefix, length = rng.choice(CARD_BRANDS)
    partial = prefix + _d(rng, length - len(prefix) - 1)
    return partial + luhn_check_digit(partial)


def format_card(rng: random.Random, number: str) -> str:
    sep = rng.choice(" -")
    if rng.random() < 0.4:
        return number
    if len(number) in (16, 19):
        return sep.join(number[i : i + 4] for i in range(0, len(number), 4))
    if len(number) in (14, 15):
        return f"{number[:4]}{sep}{number[4:10]}{sep}{number[10:]}"
    return number


def gen_card(rng: random.Random) -> Planted:
    return _whole(format_card(rng, card_number(rng)))


IBAN_COUNTRIES = {  # country: (length, letters at the start of the BBAN)
    "DE": (22, 0), "GB": (22, 4), "FR": (27, 0), "ES": (24, 0), "IT": (27, 1), "NL": (18, 4),
    "BE": (16, 0), "CH": (21, 0), "AT": (20, 0), "PL": (28, 0), "NO": (15, 0), "IE": (22, 4),
    "SE": (24, 0), "PT": (25, 0), "SA": (24, 0), "BR": (29, 0), "MT": (31, 4), "LC": (32, 4),
}  # fmt: skip


def iban_value(rng: random.Random) -> str:
    country = rng.choice(sorted(IBAN_COUNTRIES))
    length, letters = IBAN_COUNTRIES[country]
    bban = "".join(rng.choice(string.ascii_uppercase) for _ in range(letters))
    bban += _d(rng, length - 4 - letters)
    return country + iban_check_digits(country, bban) + bban


def format_iban(rng: random.Random, iban: str) -> str:
    if rng.random() < 0.5:
        return iban
    return " ".join(iban[i : i + 4] for i in range(0, len(iban), 4))


def gen_iban(rng: random.Random) -> Planted:
    return _whole(format_iban(rng, iban_value(rng)))


def ssn_value(rng: random.Random) -> str:
    area = rng.choice([a for a in range(1, 900) if a != 666])
    return f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"


def gen_ssn(rng: random.Random) -> Planted:
    return _whole(ssn_value(rng))


CN_REGIONS = ["110105", "310104", "440305", "510107", "330106", "320102", "420111", "610113"]


def cn_id_value(rng: random.Random) -> str:
    born = date(1950, 1, 1) + timedelta(days=rng.randrange(365 * 60))
    first17 = rng.choice(CN_REGIONS) + born.strftime("%Y%m%d") + _d(rng, 3)
    return first17 + cn_check_char(first17)


def gen_cn_id(rng: random.Random) -> Planted:
    return _whole(cn_id_value(rng))


def pem_block(rng: random.Random, style: str = "lines") -> str:
    """A PEM private key: one base64 line each (`lines`), all on one line (`spaces`), with
    escaped newlines as in a JSON string (`escaped`), or cut off before its END (`truncated`)."""
    label = rng.choice(["RSA ", "EC ", "OPENSSH ", "", "ENCRYPTED "])
    b64 = string.ascii_letters + string.digits + "+/"
    lines = [f"-----BEGIN {label}PRIVATE KEY-----"]
    lines += ["".join(rng.choice(b64) for _ in range(64)) for _ in range(rng.randint(2, 6))]
    lines[-1] += "=" * rng.randint(0, 2)
    if style != "truncated":
        lines.append(f"-----END {label}PRIVATE KEY-----")
    return {"spaces": " ", "escaped": "\\n"}.get(style, "\n").join(lines)


SECRET_NAMES = ["api_key", "API_KEY", "auth_token", "client_secret", "DB_PASSWORD", "password",
                "secret", "access_token", "SECRET_KEY", "apiKey"]  # fmt: skip


def gen_secret(rng: random.Random) -> Planted:
    choice = rng.randrange(11)
    if choice == 0:
        return _whole(pem_block(rng, rng.choice(["lines", "spaces", "escaped", "truncated"])))
    if choice == 1:
        return _whole(
            rng.choice(["sk-" + _token(rng, 48), "sk-proj-" + _token(rng, 64, ALNUM + "-_")])
        )
    if choice == 2:
        return _whole("AKIA" + _token(rng, 16, string.ascii_uppercase + "234567"))
    if choice == 3:
        return _whole(
            rng.choice(["ghp_", "gho_", "ghs_", "ghu_"]) + _token(rng, 36)
            if rng.random() < 0.7
            else "github_pat_" + _token(rng, 22) + "_" + _token(rng, 59)
        )
    if choice == 4:
        kind = rng.choice("abpr")
        return _whole(f"xox{kind}-{_d(rng, 12)}-{_d(rng, 13)}-{_token(rng, 24)}")
    if choice == 5:
        return _whole("AIza" + _token(rng, 35, ALNUM + "-_"))
    if choice == 6:
        return _whole(rng.choice(["sk_live_", "rk_live_"]) + _token(rng, 24))
    if choice == 7:
        if rng.random() < 0.5:  # opaque
            token = _token(rng, rng.randint(24, 48), ALNUM + "-_")
        else:  # JWT-like: three base64url segments joined by dots
            token = ".".join(_token(rng, rng.randint(12, 40), ALNUM + "-_") for _ in range(3))
        return f"Authorization: Bearer {token}", 22, 22 + len(token)
    name = rng.choice(SECRET_NAMES)
    value = _token(rng, rng.randint(24, 40), ALNUM + "+/")
    fragment = rng.choice(
        [f"{name}={value}", f'{name} = "{value}"', f'"{name}": "{value}"', f"{name}: {value}"]
    )
    start = fragment.index(value)
    return fragment, start, start + len(value)


GENERATORS: dict[str, Callable[[random.Random], Planted]] = {
    "email": gen_email,
    "phone": gen_phone,
    "ip_address": gen_ip,
    "credit_card": gen_card,
    "iban": gen_iban,
    "ssn": gen_ssn,
    "id_number": gen_cn_id,
    "secret": gen_secret,
}

EN_TEMPLATES = [
    "Please contact me at {} for details.",
    "{}",
    "My details: {}.",
    "Send it to {} before Friday!",
    "Reach out via {}, thanks.",
    "The form said {} and nothing else",
]
ZH_TEMPLATES = [
    "请联系{}或者稍后再试",
    "他的信息是{}，请核对。",
    "资料：{}。",
    "请把{}删掉",
    "客户留下了{}以便回访",
]


def plant(rng: random.Random, planted: Planted) -> tuple[str, int, int]:
    template = rng.choice(EN_TEMPLATES if rng.random() < 0.5 else ZH_TEMPLATES)
    fragment, start, end = planted
    offset = template.index("{}")
    return template.format(fragment), offset + start, offset + end


# --------------------------------------------------------------------------------------------
# negatives
# --------------------------------------------------------------------------------------------


def negative_values(rng: random.Random) -> list[str]:
    out: list[str] = []
    r = rng.randint
    for _ in range(6):
        out += [
            f"{r(0, 9)}.{r(0, 20)}.{r(0, 30)}",
            f"v{r(0, 9)}.{r(0, 20)}.{r(0, 30)}",
            f"10.0.{r(19041, 22631)}.{r(1, 3000)}",
            f"version {r(1, 9)}.{r(0, 9)}.{r(0, 9)}.{r(0, 99)}",
            f"Version: {r(1, 9)}.{r(0, 9)}.{r(0, 9)}.{r(0, 99)}",
            f"build {r(1, 20)}.{r(0, 9)}.{r(0, 200)}.{r(0, 255)}",
            f"版本{r(1, 9)}.{r(0, 9)}.{r(0, 9)}.{r(0, 99)}",
            f"v{r(1, 9)}.{r(0, 9)}.{r(0, 9)}.{r(0, 99)}",
            f"{r(1, 9)}.{r(0, 9)}.{r(0, 9)}.{r(0, 9)}.{r(0, 9)}",
            f"{r(256, 999)}.{r(0, 255)}.{r(0, 255)}.{r(0, 255)}",
        ]
        day = date(2000, 1, 1) + timedelta(days=r(0, 9000))
        out += [
            day.isoformat(),
            day.strftime("%d/%m/%Y"),
            day.strftime("%m/%d/%Y"),
            day.strftime("%d.%m.%Y"),
            day.strftime("%Y.%m.%d"),
            f"{r(0, 23):02d}:{r(0, 59):02d}:{r(0, 59):02d}",
            f"{day.isoformat()}T{r(0, 23):02d}:{r(0, 59):02d}:{r(0, 59):02d}Z",
            f"{day.year}年{day.month}月{day.day}日",
            f"978-{r(0, 9)}-{r(10, 99)}-{_d(rng, 6)}-{r(0, 9)}",
            f"ISBN {r(0, 9)}-{_d(rng, 3)}-{_d(rng, 5)}-{r(0, 9)}",
            f"978{_d(rng, 10)}",
        ]
        good = card_number(rng)
        bad = good[:-1] + str((int(good[-1]) + r(1, 9)) % 10)
        out += [format_card(rng, bad), bad]
        out += [
            f"Order #ORD-{day.year}-{_d(rng, 6)}",
            f"tracking number 1Z{_token(rng, 6, string.ascii_uppercase + string.digits)}"
            f"{_d(rng, 10)}",
            "9400 " + " ".join(_d(rng, 4) for _ in range(4)) + " " + _d(rng, 2),
            f"订单号{r(4, 6)}{_d(rng, 15)}",
            f"order no. {card_number(rng)}",
            f"invoice INV-{_d(rng, 8)}",
        ]
        out += [
            f"{r(1000, 10**9):,}",
            f"${r(1, 10**6):,}.{r(0, 99):02d}",
            f"{r(1, 9)},{r(100, 999)},{r(100, 999)}.{r(10, 99)}",
            str(r(0, 10**6)),
            f"{r(0, 99)}.{r(0, 99)}%",
            "3.14159",
        ]
        out += [
            f"{rng.getrandbits(160):040x}",
            f"{rng.getrandbits(256):064x}",
            f"commit {rng.getrandbits(28):07x}",
            f"sha256:{rng.getrandbits(256):064x}",
            str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            str(r(1_000_000_000, 1_900_000_000)),
            str(r(1_000_000_000_000, 1_900_000_000_000)),
        ]
        valid_id = cn_id_value(rng)
        wrong = "0123456789X".replace(valid_id[-1], "")
        out.append(valid_id[:-1] + rng.choice(wrong))
        out += [
            f"1{r(0, 2)}{_d(rng, 9)}",
            f"{r(2, 9)}{_d(rng, 10)}",
            f"000-{r(10, 99)}-{r(1000, 9999)}",
            f"666-{r(10, 99)}-{r(1000, 9999)}",
            f"{r(900, 999)}-{r(10, 99)}-{r(1000, 9999)}",
            f"{r(100, 665)}-00-{r(1000, 9999)}",
            f"{r(100, 665)}-{r(10, 99)}-0000",
        ]
        iban = iban_value(rng)
        bad_check = f"{(int(iban[2:4]) + r(1, 90)) % 97 + 2:02d}"
        if bad_check != iban[2:4]:
            out.append(format_iban(rng, iban[:2] + bad_check + iban[4:]))
        out += [
            f"{r(10, 99)}:{r(10, 99)}:{r(10, 99)}:{r(10, 99)}:{r(10, 99)}:{r(10, 99)}",  # MAC-ish
            "the ratio 1:2:3 holds",
            "std::vector<int>",
            "an sk-learn-compatible-pipeline-for-everyone",
            "the key: understanding comes first",
            f"password: hunter{r(1, 99)}",
            "token=abc123",
            f"x+{r(1, 9)} {r(1, 99)}",
            f"RFC {r(1000, 9999)}",
            f"价格{r(1, 9)},{r(100, 999)},{r(100, 999)}.{r(10, 99)}元",
            " ".join(str(r(0, 9)) for _ in range(12)),
            f"订单号1{r(3, 9)}{_d(rng, 9)}",
            f"room {r(1, 9)}.{r(1, 9)}.{r(1, 99)} at {r(0, 23):02d}:{r(0, 59):02d}",
            f"ext. {_d(rng, 4)}",
            f"logo@{r(2, 3)}x.png",
            f"section {r(1, 9)}.{r(1, 9)}.{r(1, 9)}.{r(1, 9)}",
            "Bearer tokens are short-lived",
        ]
    return out


def build_corpus() -> tuple[list[tuple[str, str, int, int]], list[str]]:
    rng = random.Random(SEED)
    positives = []
    for kind, generate in GENERATORS.items():
        for _ in range(99 if kind == "secret" else 65):
            text, start, end = plant(rng, generate(rng))
            positives.append((kind, text, start, end))
    negatives = []
    for value in negative_values(rng):
        template = rng.choice(EN_TEMPLATES if rng.random() < 0.5 else ZH_TEMPLATES)
        negatives.append(template.format(value))
    return positives, negatives


POSITIVES, NEGATIVES = build_corpus()


# --------------------------------------------------------------------------------------------
# the corpus
# --------------------------------------------------------------------------------------------


def test_corpus_is_big_enough() -> None:
    assert len(POSITIVES) >= 500 and len(NEGATIVES) >= 300
    per_kind = Counter(kind for kind, *_ in POSITIVES)
    assert set(per_kind) == set(pii.rule_kinds())
    assert min(per_kind.values()) >= 30


def test_recall_and_precision_on_synthetic_corpus() -> None:
    scanner = pii.PiiScanner()
    found_per_kind: Counter[str] = Counter()
    reported_per_kind: Counter[str] = Counter()
    total_per_kind = Counter(kind for kind, *_ in POSITIVES)
    true_positive = reported = 0
    misses: list[str] = []
    false_positives: list[str] = []
    for kind, text, start, end in POSITIVES:
        matches = scanner.find(text)
        reported += len(matches)
        reported_per_kind.update(m.kind for m in matches)
        hit = [m for m in matches if (m.kind, m.start, m.end) == (kind, start, end)]
        if hit:
            found_per_kind[kind] += 1
            true_positive += 1
        else:
            misses.append(
                f"{kind}: {text!r} -> {[(m.rule, text[m.start : m.end]) for m in matches]}"
            )
        false_positives += [f"{m.rule}: {text[m.start : m.end]!r} in {text!r}" for m in matches
                            if m not in hit]  # fmt: skip
    for text in NEGATIVES:
        matches = scanner.find(text)
        reported += len(matches)
        reported_per_kind.update(m.kind for m in matches)
        false_positives += [f"{m.rule}: {text[m.start : m.end]!r} in {text!r}" for m in matches]

    recall_per_kind = {k: found_per_kind[k] / total_per_kind[k] for k in sorted(total_per_kind)}
    recall = true_positive / len(POSITIVES)
    precision = true_positive / reported
    report = (
        f"recall {recall:.4f}, precision {precision:.4f}\n"
        + "".join(f"  {k}: recall {v:.3f}, precision "
                  f"{found_per_kind[k] / max(1, reported_per_kind[k]):.3f}\n"
                  for k, v in recall_per_kind.items())
        + "misses:\n  " + "\n  ".join(misses[:15])
        + "\nfalse positives:\n  " + "\n  ".join(false_positives[:15])
    )  # fmt: skip
    assert recall >= 0.99, report
    assert precision >= 0.97, report
    assert all(v >= 0.95 for v in recall_per_kind.values()), report


def test_find_is_sorted_non_overlapping_and_agrees_with_contains() -> None:
    scanner = pii.PiiScanner()
    rng = random.Random(SEED + 1)
    texts = [t for _, t, _, _ in POSITIVES] + NEGATIVES
    # also long documents mixing several values, so that overlaps and windows get exercised
    for _ in range(20):
        parts = rng.sample(texts, 12)
        texts.append(" ".join(parts))
    for text in texts:
        matches = scanner.find(text)
        assert all(a.end <= b.start for a, b in itertools.pairwise(matches))
        assert all(m.start < m.end for m in matches)
        assert scanner.contains(text) == bool(matches)


def test_prefilter_windows_match_a_full_scan() -> None:
    """The fast path (prefilters and windows) finds exactly what plain full-text scans find."""
    reference = pii.PiiScanner(
        [dataclasses.replace(r, prefilter=None, reach=None) for r in pii.RULES]
    )
    fast = pii.PiiScanner()
    rng = random.Random(SEED + 2)
    texts = [t for _, t, _, _ in POSITIVES] + NEGATIVES
    filler = "Ordinary prose with numbers like 2024 and 3.5 percent, nothing personal. " * 8
    long_docs = []
    for _ in range(30):
        parts = [rng.choice(texts) if rng.random() < 0.5 else filler for _ in range(10)]
        long_docs.append("".join(parts))
    for text in texts + long_docs:
        assert fast.find(text) == reference.find(text), text


# --------------------------------------------------------------------------------------------
# validators
# --------------------------------------------------------------------------------------------


def test_luhn_valid_matches_reference() -> None:
    assert pii.luhn_valid("79927398713")  # the textbook example
    assert pii.luhn_valid("4111 1111 1111 1111") and not pii.luhn_valid("4111 1111 1111 1112")
    rng = random.Random(SEED + 3)
    for _ in range(500):
        number = _d(rng, rng.randint(2, 19))
        assert pii.luhn_valid(number) == naive_luhn(number), number
    for _ in range(100):
        assert pii.luhn_valid(card_number(rng))
    assert not pii.luhn_valid("") and not pii.luhn_valid("0")


def test_iban_valid() -> None:
    assert pii.iban_valid("GB82 WEST 1234 5698 7654 32")  # examples from the IBAN registry
    assert pii.iban_valid("DE89370400440532013000")
    assert not pii.iban_valid("GB82 WEST 1234 5698 7654 33")  # one digit changed
    assert not pii.iban_valid("GB82 WEST 1234 5698 7654")  # wrong length for GB
    assert not pii.iban_valid("ZZ82 WEST 1234 5698 7654 32")  # no such country
    rng = random.Random(SEED + 4)
    for _ in range(200):
        iban = iban_value(rng)
        assert pii.iban_valid(iban) and pii.iban_valid(format_iban(rng, iban))
        for check in range(100):
            if f"{check:02d}" != iban[2:4]:
                assert not pii.iban_valid(iban[:2] + f"{check:02d}" + iban[4:])


def test_cn_id_valid() -> None:
    assert pii.cn_id_valid("11010519491231002X")  # the GB 11643 example
    assert pii.cn_id_valid("11010519491231002x")
    assert not pii.cn_id_valid("110105194912310021")
    first17 = "11010519490231002"  # 31 February
    assert not pii.cn_id_valid(first17 + cn_check_char(first17))
    first17 = "99010519491231002"  # no province 99
    assert not pii.cn_id_valid(first17 + cn_check_char(first17))
    rng = random.Random(SEED + 5)
    for _ in range(200):
        value = cn_id_value(rng)
        assert pii.cn_id_valid(value)
        assert pii.cn_id_check_char(value[:17]) == value[17]
        for wrong in "0123456789X".replace(value[17], ""):
            assert not pii.cn_id_valid(value[:17] + wrong)


def test_ssn_valid_excludes_invalid_areas_groups_and_serials() -> None:
    assert pii.ssn_valid("123-45-6789") and pii.ssn_valid("899-01-0001")
    for bad in ["000-12-3456", "666-12-3456", "900-12-3456", "999-12-3456", "123-00-4567",
                "123-45-0000", "12-345-6789", "abc-de-fghi"]:  # fmt: skip
        assert not pii.ssn_valid(bad), bad
    assert pii.find_pii("SSN 666-12-3456, 901-12-3456 and 123-00-4567") == []


def test_ipv4_octets_and_version_context() -> None:
    assert pii.ipv4_valid("192.168.1.1") and pii.ipv4_valid("0.0.0.0")
    assert not pii.ipv4_valid("256.1.1.1") and not pii.ipv4_valid("192.168.01.1")
    kinds = [m.kind for m in pii.find_pii("from 10.0.0.1 to 255.255.255.255")]
    assert kinds == ["ip_address", "ip_address"]
    for text in ["10.0.19041.1", "version 1.2.3.4", "Build: 4.2.1.7", "v1.2.3.4", "版本1.2.3.4",
                 "1.2.3.4.5", "1.2.3"]:  # fmt: skip
        assert pii.find_pii(text) == [], text
    # deliberate: a bare dotted quad with valid octets is an address
    assert [m.rule for m in pii.find_pii("see 1.2.3.4 now")] == ["ipv4"]


def test_ipv6() -> None:
    for good in ["2001:0db8:85a3:0000:0000:8a2e:0370:7334", "2001:db8::8a2e:370:7334", "fe80::1",
                 "::1", "::ffff:192.0.2.1"]:  # fmt: skip
        assert pii.ipv6_valid(good), good
        assert [(m.kind, m.start, m.end) for m in pii.find_pii(f"地址{good}已配置")] == [
            ("ip_address", 2, 2 + len(good))
        ]
    for bad in ["::", "12:30:45", "00:1A:2B:3C:4D:5E", "1:2:3", "2001:db8::1::2", "fe80:::1"]:
        assert not pii.ipv6_valid(bad), bad
        assert pii.find_pii(bad) == [], bad


# --------------------------------------------------------------------------------------------
# scanner behaviour
# --------------------------------------------------------------------------------------------


def test_scrub_replaces_with_placeholders_and_counts_per_rule() -> None:
    text = "请联系13812345678或发邮件到zhang.wei@example.cn，抄送 li@example.com。"
    scrubbed, counts = pii.PiiScanner().scrub(text)
    assert scrubbed == "请联系<PHONE>或发邮件到<EMAIL>，抄送 <EMAIL>。"
    assert counts == {"email": 2, "phone_cn": 1}
    assert pii.scrub("身份证号11010519491231002X") == ("身份证号<ID_NUMBER>", {"cn_id": 1})
    assert pii.scrub("nothing here") == ("nothing here", {})
    secret = "api_key = 'a8F3kLm2Qz9XbP4rT7vW1yN6'"
    assert pii.scrub(secret) == ("api_key = '<SECRET>'", {"secret_assignment": 1})


def test_every_rule_has_its_kinds_placeholder() -> None:
    assert len(set(pii.rule_names())) == len(pii.RULES)
    for rule in pii.RULES:
        assert rule.placeholder == f"<{rule.kind.upper()}>"
        assert rule.description
    assert set(pii.rule_kinds()) == set(GENERATORS)


def test_overlapping_matches_leftmost_longest_wins() -> None:
    scanner = pii.PiiScanner()
    assert [m.rule for m in scanner.find("mail 13812345678@qq.com")] == ["email"]
    text = "call +86 138 1234 5678 now"
    assert [(m.rule, text[m.start : m.end]) for m in scanner.find(text)] == [
        ("phone_intl", "+86 138 1234 5678")
    ]
    # base64 that happens to contain an AWS key id: the block starts first and is longer
    block = pem_block(random.Random(SEED)).replace("\n", "\n+AKIAIOSFODNN7EXAMPLE/", 1)
    assert [m.rule for m in scanner.find(block)] == ["private_key"]
    assert [m.rule for m in pii.PiiScanner(["aws_access_key_id"]).find(block)] == [
        "aws_access_key_id"
    ]
    token = "ghp_" + "aB3" * 12
    text = f"GITHUB_TOKEN={token}"
    # same span from two rules: the earlier rule in the registry names it
    assert [(m.rule, m.start) for m in scanner.find(text)] == [("github_token", 13)]


def test_secret_shapes() -> None:
    rng = random.Random(SEED + 6)
    for style in ["lines", "spaces", "escaped", "truncated"]:
        block = pem_block(rng, style)
        text = f"key below\n{block}\n\nThanks, John."
        assert pii.scrub(text) == ("key below\n<SECRET>\n\nThanks, John.", {"private_key": 1})
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0T"
    assert pii.scrub(f"Authorization: Bearer {jwt}")[0] == "Authorization: Bearer <SECRET>"
    assert pii.scrub("curl -H 'authorization: bearer abc'")[1] == {}  # too short to be a secret
    for value in ["hunter2", "understanding2024things", "aaaaaaaaaaaaaaaaaaaaaaaa1"]:
        assert pii.find_pii(f"password={value}") == [], value
    assert pii.find_pii("pip install scikit-learn; an sk-learn-compatible-pipeline-v2") == []
    git_sha = f"{rng.getrandbits(160):040x}"
    assert pii.find_pii(f"commit {git_sha}, uuid {uuid.UUID(int=rng.getrandbits(128))}") == []


def test_reference_context_vetoes_card_and_phone_numbers() -> None:
    card = card_number(random.Random(SEED + 7))
    assert [m.kind for m in pii.find_pii(f"card {card}")] == ["credit_card"]
    for context in ["order no. ", "Order number: ", "tracking #", "订单号", "运单号："]:
        assert pii.find_pii(f"{context}{card}") == [], context
        assert pii.find_pii(f"{context}13812345678") == [], context


def test_email_is_not_an_image_file_name() -> None:
    assert [m.rule for m in pii.find_pii("logo@2x.png next to me@example.com")] == ["email"]


def test_contains_stops_early_and_agrees_with_find() -> None:
    scanner = pii.PiiScanner()
    assert scanner.contains("write to a@example.com")
    assert not scanner.contains("version 1.2.3 released on 2024-01-15")
    assert pii.contains_pii("AKIAIOSFODNN7EXAMPLE") and not pii.contains_pii("")


def test_rule_subset_selection_by_name_and_kind() -> None:
    text = "a@example.com, 13812345678, (415) 555-0132, 192.168.0.1"
    only_email = pii.PiiScanner(["email"])
    assert [m.rule for m in only_email.find(text)] == ["email"]
    phones = pii.PiiScanner(["phone"])
    assert [r.name for r in phones.rules] == ["phone_intl", "phone_cn", "phone_nanp"]
    assert [m.kind for m in phones.find(text)] == ["phone", "phone"]
    reordered = pii.PiiScanner(["ipv4", "email", "ipv4"])  # registry order, no duplicates
    assert [r.name for r in reordered.rules] == ["email", "ipv4"]
    assert reordered.signature == f"{pii.PII_RULES_VERSION}:email,ipv4"
    assert pii.PiiScanner([]).find(text) == []
    assert [r.name for r in pii.PiiScanner().rules] == list(pii.rule_names())


def test_unknown_rule_name_is_an_lmforge_error() -> None:
    with pytest.raises(LmforgeError, match=r"unknown PII rule 'passport'.*email"):
        pii.PiiScanner(["email", "passport"])
    with pytest.raises(LmforgeError, match="unique"):
        pii.PiiScanner(["email", pii.RULES[0], pii.RULES[0]])


def test_version_string_exists() -> None:
    assert isinstance(pii.PII_RULES_VERSION, str) and pii.PII_RULES_VERSION
    assert pii.default_scanner().signature.startswith(pii.PII_RULES_VERSION + ":")


def test_scanner_pickles_and_is_thread_safe() -> None:
    scanner = pii.PiiScanner(["email", "phone", "secret"])
    # what multiprocessing does to hand a scanner to workers
    clone = pickle.loads(pickle.dumps(scanner))  # noqa: S301 - our own object, just dumped
    texts = [t for _, t, _, _ in POSITIVES[:200]]
    serial = [scanner.scrub(t) for t in texts]
    assert [clone.scrub(t) for t in texts] == serial
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(scanner.scrub, texts)) == serial
