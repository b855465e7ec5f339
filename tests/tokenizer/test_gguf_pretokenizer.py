"""GGUF pre-tokenizer names → `tokenizers` pre-tokenizers, checked against the regexes themselves.

The reference splits with the `regex` module (the one OpenAI's GPT-2 `encoder.py` uses) and maps
bytes to characters with GPT-2's `bytes_to_unicode`.
"""

from __future__ import annotations

import pytest

from lmforge.errors import LmforgeError
from lmforge.tokenizer.gguf import pre_tokenizer_for, tokenizer_from_gguf_fields

regex = pytest.importorskip("regex")

# openai/gpt-2 src/encoder.py
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# llama.cpp src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_LLAMA3
LLAMA3_PATTERN = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TEXTS = [
    "Hello world, it's  fine\n\n  ok",
    "x1y22 z333 4444 55555 year 2024!",
    "naïve café 東京 🙂 I'll we've I'LL  \t tabs\r\n\r\nend",
    "3.14159 and -42 and 1,000,000",
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (openai/gpt-2 src/encoder.py)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


BYTE_CHARS = bytes_to_unicode()


def byte_level(piece: str) -> str:
    return "".join(BYTE_CHARS[b] for b in piece.encode("utf-8"))


def reference_split(text: str, pattern: str, *, digits_first: bool = False) -> list[str]:
    chunks = regex.split(r"(\p{N})", text) if digits_first else [text]
    return [byte_level(p) for chunk in chunks if chunk for p in regex.findall(pattern, chunk)]


def ours(name: str, text: str) -> list[str]:
    return [piece for piece, _ in pre_tokenizer_for(name).pre_tokenize_str(text)]


def test_smollm_splits_digits_one_by_one():  # type: ignore[no-untyped-def]
    assert ours("smollm", "a 2024b") == ["a", "Ġ", "2", "0", "2", "4", "b"]


@pytest.mark.parametrize("text", TEXTS)
def test_smollm_matches_gpt2_regex_after_digit_split(text):  # type: ignore[no-untyped-def]
    assert ours("smollm", text) == reference_split(text, GPT2_PATTERN, digits_first=True)


@pytest.mark.parametrize("name", ["gpt2", "default"])
@pytest.mark.parametrize("text", TEXTS)
def test_gpt2_pretokenizer_matches_gpt2_regex(name, text):  # type: ignore[no-untyped-def]
    assert ours(name, text) == reference_split(text, GPT2_PATTERN)


@pytest.mark.parametrize("text", TEXTS)
def test_llama3_pretokenizer_matches_its_regex(text):  # type: ignore[no-untyped-def]
    assert ours("llama-bpe", "Hello 12345") == ["Hello", "Ġ", "123", "45"]
    assert ours("llama-bpe", text) == reference_split(text, LLAMA3_PATTERN)


# llama.cpp src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_QWEN2 and _QWEN35
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
QWEN35_PATTERN = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+"
    r"|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
MORE_TEXTS = [
    *TEXTS,
    "it'ſ the long s, not 's; I'LL, we'Ve",  # (?i:'s) would take "'ſ"; llama.cpp does not
    "हिन्दी देवनागरी e\u0301 ภาษาไทย",  # combining marks (\p{M})
]


@pytest.mark.parametrize(
    ("names", "pattern"),
    [
        (("llama-bpe", "llama3", "dbrx", "smaug-bpe"), LLAMA3_PATTERN),
        (("qwen2", "deepseek-r1-qwen", "stablelm2"), QWEN2_PATTERN),
        (("qwen35",), QWEN35_PATTERN),
        (("gpt-2", "olmo", "mpt", "phi-2"), GPT2_PATTERN),
    ],
)
@pytest.mark.parametrize("text", MORE_TEXTS)
def test_named_pretokenizers_match_their_regex(names, pattern, text):  # type: ignore[no-untyped-def]
    for name in names:
        assert ours(name, text) == reference_split(text, pattern), name


@pytest.mark.parametrize("name", ["starcoder", "refact", "command-r", "smollm"])
def test_starcoder_family_splits_digits_first(name):  # type: ignore[no-untyped-def]
    text = MORE_TEXTS[1]
    assert ours(name, text) == reference_split(text, GPT2_PATTERN, digits_first=True)


def test_unknown_pretokenizer_is_refused_in_one_line():  # type: ignore[no-untyped-def]
    with pytest.raises(LmforgeError) as info:
        tokenizer_from_gguf_fields(bpe_meta("tekken2"), "m.gguf")
    msg = str(info.value)
    assert "\n" not in msg
    for needle in ("m.gguf", "tokenizer.ggml.pre", "'tekken2'", "llama-bpe", "qwen2", "smollm"):
        assert needle in msg, msg


BOS = "tokenizer.ggml.bos_token_id"


def bpe_meta(pre: str, **extra):  # type: ignore[no-untyped-def]
    """A byte-level vocabulary where "abc" is a token no merge sequence reaches."""
    tokens = ["<|endoftext|>", "a", "b", "c", "ab", "abc", "Ġ"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 1, 1, 1, 1, 1, 1],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.eos_token_id": 0,
        **extra,
    }


def test_llama3_takes_a_word_that_is_a_token_whole():  # type: ignore[no-untyped-def]
    """llama.cpp sets ignore_merges (and BOS by default) for "llama-bpe", not for "dbrx"."""
    llama3 = tokenizer_from_gguf_fields(bpe_meta("llama-bpe", **{BOS: 0}), "l")
    dbrx = tokenizer_from_gguf_fields(bpe_meta("dbrx", **{BOS: 0}), "d")
    assert llama3.encode("abc") == [0, 5]
    assert dbrx.encode("abc") == [4, 3]
    assert llama3.encode("abc<|endoftext|>", add_special_tokens=False) == [5, 0]


def test_default_is_read_as_gpt2_with_a_warning(caplog):  # type: ignore[no-untyped-def]
    tok = tokenizer_from_gguf_fields(bpe_meta("default"), "m.gguf")
    assert tok.encode("ab c") == [4, 6, 3]
    assert "tokenizer.ggml.pre 'default'" in caplog.text
