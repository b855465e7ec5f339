"""Tests for `lmforge.data.clean`: normalize, words, every quality rule, line removal, stats."""

from __future__ import annotations

import pickle
import random
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from lmforge.data.clean import (
    FILTER_NAMES,
    LINE_RULE_NAMES,
    FilterResult,
    QualityConfig,
    QualityFilter,
    ngram_tokens,
    normalize,
    split_words,
)
from lmforge.errors import LmforgeError

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared/data/tinyshakespeare/input.txt"

_VOCAB_TEXT = (
    "river mountain village morning evening garden window letter market winter summer "
    "teacher student doctor farmer captain soldier painter writer sister brother mother "
    "father friend stranger neighbor children family kitchen table chair basket bread "
    "water coffee orange apple silver golden quiet gentle bright dark narrow wide empty "
    "heavy early late small large ancient modern simple careful honest patient walked "
    "carried opened closed watched noticed remembered forgot wrote read listened answered "
    "asked waited followed found lost built painted cooked laughed smiled slowly quickly "
    "often never always almost nearly perhaps again together alone inside outside before "
    "after during because although while since until toward beyond across beneath above "
    "the a of and to in on with for from at by as that this every each another"
)
VOCAB = _VOCAB_TEXT.split()


def prose(n_words: int, seed: int = 0, *, words_per_paragraph: int = 120) -> str:
    """Seeded random English-like sentences, in paragraphs separated by blank lines."""
    rng = random.Random(seed)
    paragraphs: list[str] = []
    sentences: list[str] = []
    count = in_paragraph = 0
    while count < n_words:
        length = rng.randint(6, 18)
        words = rng.choices(VOCAB, k=length)
        sentences.append(" ".join(words).capitalize() + rng.choice(".....?!;"))
        count += length
        in_paragraph += length
        if in_paragraph >= words_per_paragraph:
            paragraphs.append(" ".join(sentences))
            sentences, in_paragraph = [], 0
    if sentences:
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs) + "\n"


def pseudo_words(n: int, seed: int) -> list[str]:
    """Distinct made-up lowercase words of 4 to 8 letters."""
    rng = random.Random(seed)
    words: dict[str, None] = {}
    while len(words) < n:
        words["".join(rng.choices("abcdefghiklmnoprstuvwy", k=rng.randint(4, 8)))] = None
    return list(words)


ZH_ARTICLE = (
    "\n\n".join(
        [
            (
                "茶是中国人日常生活中不可缺少的饮品。早在唐代，陆羽就写下了世界上第一部关于茶的专"
                "著《茶经》，系统地记录了茶的起源、种植、采摘和煮饮方法。"
            ),
            (
                "宋代的人们喜欢点茶，把茶叶研成细末，再用沸水冲点，讲究汤色与泡沫。到了明代，朱元"
                "璋下令废除团茶，散茶从此流行起来，泡茶的方式也变得更加简单。"
            ),
            (
                "今天，中国各地出产的名茶数以百计。浙江的龙井、福建的铁观音、云南的普洱和安徽的黄"
                "山毛峰，各有各的风味。许多城市的老茶馆依然热闹，老人们在那里下棋、聊天，一坐就是"
                "一个下午。"
            ),
            (
                "年轻人则更喜欢奶茶和冷泡茶，新式茶饮店在街头巷尾随处可见。有人担心传统会因此消失"
                "，也有人认为，这正说明茶文化在不断适应新的时代。无论如何，一杯清茶所带来的宁静，"
                "仍然是许多人忙碌生活中的片刻休息。"
            ),
        ]
    )
    + "\n"
)

QUALITY = QualityFilter()


# --------------------------------------------------------------------------------------------
# normalize
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Cafe\u0301 nai\u0308ve", "Café naïve"),  # NFC composition
        ("a\r\nb\rc\n\r\n", "a\nb\nc\n\n"),  # CRLF and lone CR
        ("a\x00b\x07c\x1bd\x7fe\x80f\x9fg", "abcdefg"),  # C0, DEL, C1 controls deleted
        ("tab\tand\nnewline", "tab\tand\nnewline"),  # \t and \n kept
        ("page\x0cbreak\x0bv\x85nel\u2028ls\u2029ps", "page\nbreak\nv\nnel\nls\nps"),
        ("\ufeffhello", "hello"),  # BOM
        ("zero\u200bwidth", "zerowidth"),  # ZWSP
        ("left\u200eright\u200f\u202aembed\u202c\u2066iso\u2069", "leftrightembediso"),
        ("soft\u00adhyphen word\u2060joiner", "softhyphen wordjoiner"),
        (
            "family 👩\u200d👩\u200d👧 coder 👩\u200d💻",
            "family 👩\u200d👩\u200d👧 coder 👩\u200d💻",
        ),
        ("می\u200cخواهم", "می\u200cخواهم"),  # ZWNJ kept (Persian)
        ("a\u00a0b\u2002c\u2009d\u200ae\u202ff\u205fg", "a b c d e f g"),  # exotic spaces
        ("你好\u3000世界", "你好\u3000世界"),  # ideographic space kept
        ("bad\ud800escape", "bad\ufffdescape"),  # lone high surrogate
        ("end\udc80", "end\ufffd"),  # lone low surrogate (surrogateescape)
        ("pair \ud83d\ude00 split", "pair 😀 split"),  # a split pair is joined
        ("e\u200b\u0301", "é"),  # deleting junk lets NFC compose
    ],
)
def test_normalize_cases(raw: str, expected: str) -> None:
    assert normalize(raw) == expected


@pytest.mark.parametrize(
    "clean",
    [
        "  leading spaces\n\n\n\ntrailing spaces   \n\t\n  ",
        "",
        "\n",
        "Ünïcödé text — “quoted” 東京\u3000は 😀  \n\n\n   ",
        "plain ascii line\n",
    ],
)
def test_normalize_leaves_clean_text_alone(clean: str) -> None:
    assert normalize(clean) is clean


def test_normalize_random_text_is_clean_and_idempotent() -> None:
    pool = (
        "abc é\u0301\u00e9 \t\n\r\x00\x1f\x7f\x85\x9f\u00a0\u00ad\u2003\u200b\u200c\u200d"
        "\u200e\u2028\u202f\u3000\ufeff\ud800\udc00中😀"
    )
    rng = random.Random(1)
    for _ in range(300):
        text = normalize("".join(rng.choices(pool, k=rng.randint(0, 40))))
        assert normalize(text) == text
        assert unicodedata.is_normalized("NFC", text)
        assert "\r" not in text
        for ch in text:
            assert unicodedata.category(ch) not in ("Cs", "Cc") or ch in "\n\t"
            assert ch not in "\u00a0\u200b\ufeff\u00ad"


def test_normalize_restores_nfd_text() -> None:
    text = "Crème brûlée, São Paulo, Ångström, 한국어.\n" * 50
    assert normalize(unicodedata.normalize("NFD", text)) == text


# --------------------------------------------------------------------------------------------
# words
# --------------------------------------------------------------------------------------------


def test_split_words() -> None:
    assert split_words("Hello,  world!\n\tBye") == ["Hello,", "world!", "Bye"]
    assert split_words("Hello, world! 你好，世界") == ["Hello,", "world!", "你", "好，", "世", "界"]
    assert split_words("“你好”他说。") == ["“你", "好”", "他", "说。"]
    assert split_words("東京はカタカナ") == ["東", "京", "は", "カ", "タ", "カ", "ナ"]
    assert split_words("한국어 말") == ["한", "국", "어", "말"]
    assert split_words("iPhone15和AI") == ["iPhone15", "和", "AI"]
    # every non-space character belongs to exactly one word
    assert "".join(split_words(ZH_ARTICLE)) == "".join(ZH_ARTICLE.split())


def test_ngram_tokens() -> None:
    assert ngram_tokens('The cat -- "the CAT\'s" 你好。') == [
        "the",
        "cat",
        "the",
        "cat's",
        "你",
        "好",
    ]
    assert ngram_tokens("(e.g. 3.14!) ...") == ["e.g", "3.14"]
    assert ngram_tokens("café, Straße!") == ["café", "straße"]


# --------------------------------------------------------------------------------------------
# each rule fires on a crafted document, and not on its clean counterpart
# --------------------------------------------------------------------------------------------

CLEAN_EN = prose(300, seed=7)
NOISE = pseudo_words(400, seed=3)


def _repeat_phrase_doc(phrase: str, times: int, filler_words: int) -> str:
    """Distinct filler words with `phrase` inserted `times` times, all on one line."""
    filler = NOISE[:filler_words]
    step = max(1, filler_words // times)
    parts: list[str] = []
    for i in range(times):
        parts.extend(filler[i * step : (i + 1) * step])
        parts.append(phrase)
    parts.extend(filler[times * step :])
    return " ".join(parts) + "\n"


LONG_PARA = prose(120, seed=1).replace(". ", ".\n").strip()

CASES: list[tuple[str, str, str, dict[str, Any]]] = [
    # (expected reason, bad document, good counterpart, config overrides)
    ("empty", " \n\t \n", CLEAN_EN, {}),
    ("lorem_ipsum", CLEAN_EN + "Lorem ipsum dolor sit amet, consectetur.\n", CLEAN_EN, {}),
    (
        "curly_bracket",
        CLEAN_EN + "function f() { return 1; }\n",
        CLEAN_EN,
        {"drop_curly_bracket": True},
    ),
    ("min_chars", "Too short.", "This sentence is long enough to pass.", {}),
    ("max_chars", CLEAN_EN, CLEAN_EN[:400], {"max_chars": 500}),
    ("min_words", "Supercalifragilisticexpialidocious!", "Five small words are here.", {}),
    ("max_words", CLEAN_EN, "Only a few words are in this one.", {"max_words": 50}),
    (
        "mean_word_length",
        "a b c d e f g h i j k l m n o p q r s t u v w x y z",
        "the cat sat on the warm mat and looked at the dog",
        {},
    ),
    (
        "mean_word_length",
        "Pneumonoultramicroscopic floccinaucinihilipilification antidisestablishment "
        "incomprehensibilities counterrevolutionaries",
        "Pneumonia is a lung infection that many doctors treat every winter.",
        {},
    ),
    (
        "alpha_fraction",
        "Totals: " + " ".join(f"{i * 37 % 1000}.{i % 97:02d}" for i in range(60)),
        CLEAN_EN,
        {},
    ),
    (
        "alpha_words",
        " ".join(f"{w} {i} {w[::-1]} {i + 1}" for i, w in enumerate(NOISE[:40])),
        " ".join(
            f"{w} {i} {w[::-1]} {NOISE[100 + i]} {NOISE[200 + i]}" for i, w in enumerate(NOISE[:40])
        ),
        {},
    ),
    (
        "symbol_ratio",
        " ".join(f"#{w}" for w in NOISE[:50]),
        " ".join(NOISE[:50]) + " #one #two",
        {},
    ),
    (
        "symbol_ratio",
        " ".join(f"{w}..." for w in NOISE[:50]),
        " ".join(NOISE[:50]) + " and so on... the end.",
        {},
    ),
    (
        "bullet_lines",
        "\n".join(f"- {' '.join(NOISE[i * 6 : i * 6 + 6])}" for i in range(12)),
        "Things to pack:\n"
        + "\n".join(f"- {' '.join(NOISE[i * 6 : i * 6 + 6])}" for i in range(4))
        + "\n"
        + CLEAN_EN,
        {},
    ),
    (
        "ellipsis_lines",
        "\n".join(
            " ".join(NOISE[i * 12 : i * 12 + 12]) + ("..." if i % 2 else ".") for i in range(10)
        ),
        "\n".join(
            " ".join(NOISE[i * 12 : i * 12 + 12]) + ("..." if i % 5 == 0 else ".")
            for i in range(10)
        ),
        {},
    ),
    (
        "dup_line_fraction",
        "\n".join([*CLEAN_EN.split("\n\n")[:2], *["Click here to subscribe!"] * 6]),
        "\n".join([*CLEAN_EN.split("\n\n")[:2], "Click here to subscribe!"]),
        {},
    ),
    (
        "dup_line_char_fraction",
        "\n".join([*(" ".join(NOISE[i * 4 : i * 4 + 4]) for i in range(8)), *[CLEAN_EN[:400]] * 2]),
        "\n".join([*(" ".join(NOISE[i * 4 : i * 4 + 4]) for i in range(8)), CLEAN_EN[:400]]),
        {},
    ),
    (
        "dup_para_fraction",
        "\n\n".join(
            [p for i in range(6) for p in (prose(40, seed=i).replace(". ", ".\n"), "Read more.")]
        ),
        "\n\n".join([prose(40, seed=i).replace(". ", ".\n") for i in range(6)] + ["Read more."]),
        {},
    ),
    (
        "dup_para_char_fraction",
        "\n\n".join([*(" ".join(NOISE[i * 4 : i * 4 + 4]) for i in range(8)), *[LONG_PARA] * 2]),
        "\n\n".join([*(" ".join(NOISE[i * 4 : i * 4 + 4]) for i in range(8)), LONG_PARA]),
        {"max_dup_line_fraction": 0, "max_dup_line_char_fraction": 0},
    ),
    (
        "top_2gram",
        " ".join(f"buy now {w}" for w in NOISE[:60]),
        " ".join(f"buy now {w}" for w in NOISE[:3]) + " " + " ".join(NOISE[3:120]),
        {},
    ),
    *(
        (
            f"top_{n}gram",
            " ".join(f"{' '.join(['spam'] * n)} {w}" for w in NOISE[:60]),
            " ".join(NOISE[:200]),
            {"top_ngram_max_fractions": ((n, f),), "dup_ngram_max_fractions": ()},
        )
        for n, f in ((3, 0.18), (4, 0.16))
    ),
    (
        "dup_5gram",
        _repeat_phrase_doc("the quick brown fox jumps over the lazy dog", 10, 250),
        _repeat_phrase_doc("the quick brown fox jumps over the lazy dog", 2, 250),
        {},
    ),
    *(
        (
            f"dup_{n}gram",
            _repeat_phrase_doc(" ".join(NOISE[300 : 300 + n]), 8, 200),
            _repeat_phrase_doc(" ".join(NOISE[300 : 300 + n - 1]), 8, 200),
            {"top_ngram_max_fractions": (), "dup_ngram_max_fractions": ((n, f),)},
        )
        for n, f in ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
    ),
]


@pytest.mark.parametrize(
    ("reason", "bad", "good", "overrides"),
    CASES,
    ids=[f"{case[0]}-{i}" for i, case in enumerate(CASES)],
)
def test_rule_fires_on_bad_and_not_on_good(
    reason: str, bad: str, good: str, overrides: dict[str, Any]
) -> None:
    quality = QualityFilter(QualityConfig(**overrides))
    assert normalize(bad) == bad and normalize(good) == good
    dropped = quality.apply(bad)
    assert dropped.reason == reason
    assert dropped.text is None and not dropped.kept
    kept = quality.apply(good)
    assert kept.reason is None, kept.reason
    assert kept.text == good


def test_every_document_rule_is_covered() -> None:
    assert {case[0] for case in CASES} == set(FILTER_NAMES)


def test_disabled_rules_do_not_fire() -> None:
    short_words = "a b c d e f g h i j k l m n o p q r s t u v w x y z"
    quality = QualityFilter(QualityConfig(min_mean_word_length=0, max_mean_word_length=None))
    assert quality.apply(short_words).reason is None
    assert QualityFilter(QualityConfig(min_chars=0)).apply("Hi there you all ok").reason is None
    assert (
        QualityFilter(QualityConfig(drop_lorem_ipsum=False))
        .apply(CLEAN_EN + "Lorem ipsum dolor sit amet.\n")
        .kept
    )


def test_short_documents_skip_ngram_rules() -> None:
    text = "New York is big. New York is old. I love it."
    assert QUALITY.apply(text).reason is None
    assert QualityFilter(QualityConfig(ngram_min_words=0)).apply(text).reason == "top_2gram"


def test_filter_names_are_stable() -> None:
    # These strings are written into manifests: renaming one breaks old manifests.
    assert LINE_RULE_NAMES == ("boilerplate_lines", "short_lines")
    assert FILTER_NAMES == (
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
        "top_2gram",
        "top_3gram",
        "top_4gram",
        "dup_5gram",
        "dup_6gram",
        "dup_7gram",
        "dup_8gram",
        "dup_9gram",
        "dup_10gram",
    )


# --------------------------------------------------------------------------------------------
# the fast paths against slow obvious versions of the same statistics
# --------------------------------------------------------------------------------------------

ONLY_WORD_RULES: dict[str, Any] = {
    "drop_lorem_ipsum": False,
    "min_chars": 0,
    "min_words": 0,
    "max_symbol_word_ratio": 0,
    "max_bullet_line_fraction": 0,
    "max_ellipsis_line_fraction": 0,
    "max_dup_line_fraction": 0,
    "max_dup_line_char_fraction": 0,
    "max_dup_para_fraction": 0,
    "max_dup_para_char_fraction": 0,
    "ngram_min_words": 0,
}


def reference_reason(text: str, config: QualityConfig) -> str | None:
    """The word and n-gram rules computed the obvious way (quadratic where it is simplest)."""
    words = split_words(text)
    # CJK words: those with a character that is a word by itself.
    others = [w for w in words if not any(split_words(ch + ch) == [ch, ch] for ch in w)]
    if 2 * (len(words) - len(others)) < len(words):
        mean = sum(len(w) for w in others) / len(others)
        if mean < config.min_mean_word_length or (
            config.max_mean_word_length and mean > config.max_mean_word_length
        ):
            return "mean_word_length"
    nonspace = [ch for ch in text if not ch.isspace()]
    if sum(ch.isalpha() for ch in nonspace) < config.min_alpha_fraction * len(nonspace):
        return "alpha_fraction"
    with_letter = sum(any(ch.isalpha() for ch in w) for w in words)
    if with_letter < config.min_alpha_word_fraction * len(words):
        return "alpha_words"
    tokens = ngram_tokens(text)
    total = sum(len(t) for t in tokens)
    for n, fraction in sorted(config.top_ngram_max_fractions):
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        if grams and fraction > 0:
            gram, count = Counter(grams).most_common(1)[0]
            if count >= 2 and count * sum(len(t) for t in gram) > fraction * total:
                return f"top_{n}gram"
    for n, fraction in sorted(config.dup_ngram_max_fractions):
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        counts = Counter(grams)
        covered = [False] * len(tokens)
        for i, gram in enumerate(grams):
            if counts[gram] > 1:
                covered[i : i + n] = [True] * n
        chars = sum(len(t) for t, c in zip(tokens, covered, strict=True) if c)
        if fraction > 0 and chars > fraction * total:
            return f"dup_{n}gram"
    return None


def random_document(rng: random.Random) -> str:
    vocabulary = [
        *rng.sample(NOISE, rng.randint(2, 60)),
        *rng.sample(["12", "3.5", "#", "--", "—", "x_y", "Éa", "naïve", "ok!", "(see)"], 3),
    ]
    if rng.random() < 0.3:
        vocabulary += rng.sample(list("你好世界中文東京はカ한국"), 4)
    if rng.random() < 0.3:
        vocabulary += ["123", "4.56", "78", "#9", "%", "+-", "a1", "2b"] * rng.randint(1, 8)
    tokens = rng.choices(vocabulary, k=rng.randint(1, 150))
    if rng.random() < 0.5:  # plant a repeated phrase
        phrase = tokens[: rng.randint(2, 12)]
        for _ in range(rng.randint(1, 4)):
            at = rng.randint(0, len(tokens))
            tokens[at:at] = phrase
    separators = rng.choice([" ", " ", "\n", ""])
    return "".join(t + (separators if rng.random() < 0.9 else " ") for t in tokens)


@pytest.mark.parametrize(
    "ngram_rules",
    [
        {},
        {"top_ngram_max_fractions": ()},
        {
            "top_ngram_max_fractions": (),
            "dup_ngram_max_fractions": ((5, 0.3), (7, 0.2), (10, 0.05)),
        },
        {"top_ngram_max_fractions": ((3, 0.5),), "dup_ngram_max_fractions": ((6, 0.4), (8, 0.4))},
    ],
)
def test_rules_match_the_obvious_computation(ngram_rules: dict[str, Any]) -> None:
    config = QualityConfig(**ONLY_WORD_RULES, **ngram_rules)
    quality = QualityFilter(config)
    rng = random.Random(len(ngram_rules))
    seen = set()
    for _ in range(300):
        text = normalize(random_document(rng))
        expected = reference_reason(text, config) if text.strip() else "empty"
        assert quality.apply(text).reason == expected, text
        seen.add(expected)
    assert len(seen) >= 4  # the documents exercise several rules, and some pass


# --------------------------------------------------------------------------------------------
# Chinese
# --------------------------------------------------------------------------------------------


def test_chinese_article_passes() -> None:
    result = QUALITY.apply(ZH_ARTICLE)
    assert result.reason is None
    assert result.text is ZH_ARTICLE


def test_chinese_spam_is_dropped() -> None:
    lines = ["点击这里领取免费大奖！", "加微信立即领取现金红包", "限时优惠，先到先得！"]
    assert QUALITY.apply("\n".join(lines * 8)).reason == "dup_line_fraction"
    one_line = "最新优惠活动，" + "免费领取大奖，" * 30 + "快来参加吧。"
    assert QUALITY.apply(one_line).reason == "top_2gram"
    # Repeated sentences inside otherwise normal prose: the n-gram rules see them.
    padded = ZH_ARTICLE.replace("\n\n", "关注公众号，每天领取免费大奖。" * 3 + "\n\n")
    assert QUALITY.apply(padded).reason == "dup_5gram"


def test_chinese_rules_count_characters_as_words() -> None:
    assert QUALITY.apply("这是一个很短的句子。").reason == "min_chars"
    assert QualityFilter(QualityConfig(min_chars=5)).apply("这是一个很短的句子。").kept


# --------------------------------------------------------------------------------------------
# line rules
# --------------------------------------------------------------------------------------------


def test_boilerplate_lines_are_removed_and_counted() -> None:
    body = CLEAN_EN.split("\n\n")[:2]
    text = "\n".join(
        [
            body[0],
            "We use cookies to improve your experience.",
            "Please enable JavaScript to view the comments.",
            body[1],
            "© 2024 Example Inc. All Rights Reserved.",
        ]
    )
    result = QUALITY.apply(text)
    assert result.reason is None
    assert result.text == f"{body[0]}\n{body[1]}"
    assert result.lines_removed == {"boilerplate_lines": 3}
    assert result.chars_removed == {"boilerplate_lines": len(text) - len(result.text)}


def test_boilerplate_only_document_is_dropped_as_empty() -> None:
    result = QUALITY.apply("Privacy Policy\nTerms of Use\n")
    assert result.reason == "empty"
    assert result.lines_removed == {"boilerplate_lines": 2}
    assert result.chars_removed == {"boilerplate_lines": 28, "empty": 0}


def test_short_lines_rule() -> None:
    text = "Chapter One\n\nThe rain had not stopped for three whole days.\nHome\nShare\n"
    result = QualityFilter(QualityConfig(min_line_words=3)).apply(text)
    assert result.text == "\nThe rain had not stopped for three whole days.\n"
    assert result.lines_removed == {"short_lines": 3}
    assert QUALITY.apply(text).text is text  # off by default


def test_custom_boilerplate_phrases() -> None:
    text = CLEAN_EN + "Subscribe to our newsletter\n"
    assert QUALITY.apply(text).text == text
    custom = QualityFilter(QualityConfig(boilerplate_phrases=("subscribe to",)))
    assert custom.apply(text).text == CLEAN_EN
    assert (
        QualityFilter(QualityConfig(boilerplate_phrases=()))
        .apply(CLEAN_EN + "We use cookies.\n")
        .lines_removed
        == {}
    )


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"min_chars": -1}, "min_chars"),
        ({"min_words": 1.5}, "min_words"),
        ({"max_chars": 0}, "max_chars"),
        ({"min_chars": 100, "max_chars": 50}, "max_chars"),
        ({"min_words": 10, "max_words": 5}, "max_words"),
        ({"min_alpha_fraction": 1.5}, "min_alpha_fraction"),
        ({"max_dup_line_fraction": -0.1}, "max_dup_line_fraction"),
        ({"max_symbol_word_ratio": "lots"}, "max_symbol_word_ratio"),
        ({"min_mean_word_length": 5, "max_mean_word_length": 4}, "max_mean_word_length"),
        ({"top_ngram_max_fractions": ((5, 0.1),)}, "top_ngram_max_fractions"),
        ({"top_ngram_max_fractions": ((2, 0.1), (2, 0.2))}, "top_ngram_max_fractions"),
        ({"dup_ngram_max_fractions": ((5, 2.0),)}, "dup_ngram_max_fractions"),
        ({"dup_ngram_max_fractions": (5, 0.15)}, "dup_ngram_max_fractions"),
        ({"boilerplate_phrases": ("",)}, "boilerplate_phrases"),
        ({"boilerplate_phrases": "javascript"}, "boilerplate_phrases"),
        ({"drop_lorem_ipsum": "yes"}, "drop_lorem_ipsum"),
        ({"min_line_words": True}, "min_line_words"),
        ({"ngram_min_words": -5}, "ngram_min_words"),
    ],
)
def test_config_validation_names_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(LmforgeError, match=field):
        QualityConfig(**overrides)  # type: ignore[arg-type]


def test_config_is_frozen_and_defaults_are_documented() -> None:
    config = QualityConfig()
    with pytest.raises(AttributeError):
        config.min_chars = 5  # type: ignore[misc]
    assert config.min_chars == 20
    assert config.max_dup_line_fraction == 0.30
    assert dict(config.dup_ngram_max_fractions)[10] == 0.10


def test_filter_and_results_pickle() -> None:
    quality = QualityFilter(QualityConfig(min_chars=5, boilerplate_phrases=("foo bar",)))
    clone = pickle.loads(pickle.dumps(quality))  # noqa: S301
    text = "Some text here\nfoo bar baz\nmore text follows here\n"
    assert clone.apply(text) == quality.apply(text)
    result = quality.apply(text)
    assert isinstance(pickle.loads(pickle.dumps(result)), FilterResult)  # noqa: S301


# --------------------------------------------------------------------------------------------
# large documents
# --------------------------------------------------------------------------------------------


def test_one_megabyte_of_prose_passes_unchanged() -> None:
    text = prose(190_000, seed=11)
    assert len(text) > 1_000_000
    assert normalize(text) is text
    result = QUALITY.apply(text)
    assert result.reason is None
    assert result.text is text


def test_repetitive_megabyte_is_dropped() -> None:
    text = prose(2_000, seed=5) * 80  # the same 2,000 words, 80 times
    assert QUALITY.apply(text).reason == "dup_line_fraction"
    one_paragraph = " ".join(text.split())
    assert QUALITY.apply(one_paragraph).reason == "dup_5gram"


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="shared/data/tinyshakespeare is absent")
def test_tinyshakespeare_is_kept_byte_identical() -> None:
    raw = SHAKESPEARE.read_bytes()
    text = raw.decode("utf-8")
    assert normalize(text) is text
    result = QUALITY.apply(text)
    assert result.reason is None
    assert result.text is not None and result.text.encode("utf-8") == raw
    assert result.lines_removed == {}
