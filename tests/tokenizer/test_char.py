"""Character tokenizers: nanoGPT's vocabulary and ids, exact round trips, files and parity."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.bpe import byte_tokenizer
from lmforge.tokenizer.char import CharEncoder, char_tokenizer, is_char_tokenizer, train_char

# tinyshakespeare's 65 characters (nanoGPT's shakespeare_char vocab_size = 65).
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SPEAKERS = ["ROMEO", "JULIET", "KING RICHARD III", "First Citizen", "LADY CAPULET"]
WORDS = ["thou", "art", "my", "lord", "and", "I", "love", "thee", "well,", "what", "say'st;"]
WORDS += ["nay!", "come?", "hark", "&", "$", "3", "-"]
# Every kind of character the vocabulary must hold as one token each.
UNICODE = [
    "\n", " ", "\t", "\r", "\x00", "\x0b", "\xa0", "\u2028", "\u3000", "\u200b", "\u200d",
    "é", "ß", "Ω", "Ж", "東", "京", "한", "ू", "\u0301", "\ufe0f", "\ufffd", "\U0001d518",
    "\U00020000", "🙂", "👨", "👩", "👧", "🏽", "🇯", "🇵", "🚀",
]  # fmt: skip


def shakespeare_like(seed: int = 0, lines: int = 400) -> str:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        out.append(f"{rng.choice(SPEAKERS)}:\n")
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        out.append(" ".join(words).capitalize() + rng.choice(".?!") + "\n\n")
    return "".join(out)


def nanogpt_encode(text: str, s: str) -> tuple[list[str], list[int]]:
    """karpathy/nanoGPT data/shakespeare_char/prepare.py, verbatim in spirit."""
    chars = sorted(list(set(text)))
    stoi = {ch: i for i, ch in enumerate(chars)}
    return chars, [stoi[c] for c in s]


def test_vocabulary_and_ids_are_nanogpts() -> None:
    text = shakespeare_like()
    chars, expected = nanogpt_encode(text, text)
    tok = train_char(iter(text.splitlines(keepends=True)))
    assert [tok.id_to_token(i) for i in range(tok.vocab_size)] == chars
    assert tok.encode(text) == expected
    assert CharEncoder(tok)(text).tolist() == expected
    assert tok.decode(expected) == text


def test_sixty_five_characters_make_sixty_five_tokens() -> None:
    rng = random.Random(0)
    text = SHAKESPEARE_CHARS + "".join(rng.choice(SHAKESPEARE_CHARS) for _ in range(5000))
    tok = train_char([text])
    assert tok.vocab_size == 65
    assert tok.backend.get_added_tokens_decoder() == {}
    assert (tok.eos_token, tok.pad_token, tok.bos_token, tok.unk_token) == (None,) * 4
    assert tok.encode("\n") == [0] and tok.encode(" ") == [1] and tok.encode("z") == [64]


def unicode_text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(UNICODE) for _ in range(n))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_char(["".join(UNICODE), "abc"])


def test_every_code_point_is_one_token_and_round_trips(tok: Tokenizer) -> None:
    texts = [unicode_text(seed, n) for seed, n in enumerate([0, 1, 2, 10, 100, 1000])]
    texts += ["👨\u200d👩\u200d👧", "\n\n", "  ", "\r\n", "東京", "a\u0301"]
    encoder = CharEncoder(tok)
    for text in texts:
        ids = tok.encode(text)
        assert len(ids) == len(text)
        assert tok.decode(ids) == text, repr(text)
        assert encoder(text).tolist() == ids
    assert len(tok.encode("👨\u200d👩\u200d👧")) == 5  # a ZWJ sequence is its code points
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_unknown_character_is_an_error_naming_it(tok: Tokenizer) -> None:
    for encode in (tok.encode, CharEncoder(tok), lambda s: tok.encode_batch(["abc", s])):
        with pytest.raises(LmforgeError, match=r"character 'Z' \(U\+005A\) is not in"):
            encode("abcZ")
    with pytest.raises(LmforgeError, match=r"U\+1F600"):
        tok.encode("😀")
    with pytest.raises(LmforgeError, match=r"U\+10FFFF"):  # above every code point in the table
        CharEncoder(tok)("a\U0010ffff")


def test_lone_surrogates_read_as_replacement_characters(tok: Tokenizer) -> None:
    assert tok.encode("a\ud83db") == tok.encode("a\ufffdb")
    assert CharEncoder(tok)("a\udc80b").tolist() == tok.encode("a\ufffdb")
    assert tok.encode("\ud83d\ude42") == tok.encode("🙂")
    trained = train_char(["x\ud83dy"])
    assert [trained.id_to_token(i) for i in range(trained.vocab_size)] == ["x", "y", "\ufffd"]
    assert trained.decode(trained.encode("x\ud83d")) == "x\ufffd"


def test_special_tokens_on_request() -> None:
    tok = train_char(["hello"], special_tokens=["<|endoftext|>"])
    assert tok.vocab_size == 5  # e h l o + eos
    assert tok.eos_id == tok.pad_id == 4
    assert tok.encode("he<|endoftext|>lo") == [1, 0, 4, 2, 3]
    assert tok.decode([1, 0, 4, 2, 3]) == "helo"
    with pytest.raises(LmforgeError):
        train_char(["hello"], special_tokens=["h"])


def test_bad_vocabularies_are_errors() -> None:
    with pytest.raises(LmforgeError, match="no text"):
        train_char(iter(["", ""]))
    with pytest.raises(LmforgeError, match="single code points"):
        char_tokenizer(["a", "bc"])
    with pytest.raises(LmforgeError, match="repeat"):
        char_tokenizer(["a", "a"])
    with pytest.raises(LmforgeError, match="character-level"):
        CharEncoder(byte_tokenizer())
    assert not is_char_tokenizer(byte_tokenizer())


def test_save_load_and_transformers_give_the_same_ids(tok: Tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok.save(tmp_path)
    back = Tokenizer.load(tmp_path)
    assert is_char_tokenizer(back)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    hf_file = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for seed in range(20):
        text = unicode_text(seed, 50)
        ids = tok.encode(text)
        assert back.encode(text) == ids
        assert hf(text)["input_ids"] == ids
        assert hf_file(text)["input_ids"] == ids
        assert hf.decode(ids) == back.decode(ids) == text
    assert back.vocab_size == tok.vocab_size
    assert back.backend.to_str() == tok.backend.to_str()


def test_char_encoder_returns_int32_and_handles_empty_text(tok: Tokenizer) -> None:
    ids = CharEncoder(tok)("")
    assert ids.dtype == np.int32 and ids.size == 0
    assert tok.encode("") == []
