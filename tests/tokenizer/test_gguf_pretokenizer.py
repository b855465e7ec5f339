"""GGUF pre-tokenizer names → `tokenizers` pre-tokenizers, checked against the regexes themselves.

The reference splits with the `regex` module (the one OpenAI's GPT-2 `encoder.py` uses) and maps
bytes to characters with GPT-2's `bytes_to_unicode`.
"""

from __future__ import annotations

import pytest

from lmforge.tokenizer.gguf import pre_tokenizer_for

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
