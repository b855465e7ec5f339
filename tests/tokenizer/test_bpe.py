"""Byte-level BPE training and the byte tokenizer: exact round trips, specials, files, parity."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tokenizers import pre_tokenizers

from conftest import TINY_TEXT
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.bpe import (
    DEFAULT_SPECIALS,
    byte_chars,
    byte_tokenizer,
    min_vocab_size,
    train_bpe,
)
from lmforge.tokenizer.chat import CHATML_TEMPLATE

# Code point ranges the random texts draw from (inclusive).
RANGES = [
    (0x00, 0x1F),  # C0 controls, \x00 included
    (0x20, 0x7E),  # ASCII
    (0xA0, 0xFF),  # Latin-1
    (0x300, 0x36F),  # combining diacritics, also on their own
    (0x391, 0x3C9),  # Greek
    (0x400, 0x44F),  # Cyrillic
    (0x5D0, 0x5EA),  # Hebrew (right to left)
    (0x900, 0x97F),  # Devanagari
    (0x4E00, 0x9FFF),  # CJK
    (0xAC00, 0xD7A3),  # Hangul
    (0xE000, 0xE0FF),  # private use
    (0xFFF0, 0xFFFF),  # specials and non-characters
    (0x10000, 0x1007F),  # Linear B (astral)
    (0x1D400, 0x1D7FF),  # mathematical alphanumerics (astral)
    (0x1F300, 0x1FAFF),  # emoji
    (0x20000, 0x2A6DF),  # CJK extension B
]
WHITESPACE = [" ", "  ", "\t", "\n", "\n\n", "\r", "\r\n", "\x0b", "\x0c", "\xa0", "\u2028"]
WHITESPACE += ["\u3000", "\u200b", " \n "]
SEQUENCES = [
    "👨\u200d👩\u200d👧\u200d👦",  # ZWJ family
    "🧑🏿\u200d🚀",  # skin tone + ZWJ
    "👍🏽",  # skin tone modifier
    "🇯🇵🇺🇳",  # flags (regional indicator pairs)
    "🏳️\u200d🌈",  # variation selector + ZWJ
    "e\u0301\u0323",  # stacked combining marks
    "क्षि",  # Devanagari conjunct
    "<|endoftext",  # almost a special token
    "'s 're 've I'M",  # contractions of the split pattern
    "12345678",  # digit runs
]
MIXED_CORPUS = [
    TINY_TEXT,
    "Съешь же ещё этих мягких французских булок, да выпей чаю.\n" * 5,
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.\n" * 5,
    "いろはにほへと ちりぬるを 東京都 日本語の文章。\n" * 5,
    "다람쥐 헌 쳇바퀴에 타고파 🐿️👍🏽 👨\u200d👩\u200d👧\n" * 5,
    "def f(x):\n\treturn x ** 2  # square\r\n" * 5,
]


def random_text(rng: random.Random, pieces: int) -> str:
    out = []
    for _ in range(pieces):
        r = rng.random()
        if r < 0.3:
            out.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyzABC") for _ in range(5)))
        elif r < 0.5:
            out.append(rng.choice(WHITESPACE))
        elif r < 0.9:
            lo, hi = rng.choice(RANGES)
            out.append(chr(rng.randint(lo, hi)))
        else:
            out.append(rng.choice(SEQUENCES))
    return "".join(out)


def random_texts(seed: int = 0, n: int = 200) -> list[str]:
    rng = random.Random(seed)
    return [random_text(rng, rng.randint(0, 60)) for _ in range(n)]


def special_id(tok: Tokenizer, token: str) -> int:
    tid = tok.token_to_id(token)
    assert tid is not None, token
    return tid


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(iter(MIXED_CORPUS), vocab_size=600, length=len(MIXED_CORPUS))


@pytest.fixture(scope="module", params=["bpe", "byte"])
def tok(request: pytest.FixtureRequest, bpe: Tokenizer) -> Tokenizer:
    return bpe if request.param == "bpe" else byte_tokenizer()


# ---------------------------------------------------------------------------------------------
# Exact round trips


def test_round_trip_is_exact_on_random_unicode(tok: Tokenizer) -> None:
    texts = random_texts(seed=1) + SEQUENCES + WHITESPACE + ["", "\x00", "\ufeffBOM"]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, repr(text)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_every_byte_is_in_the_vocabulary(tok: Tokenizer) -> None:
    vocab = tok.backend.get_vocab()
    assert set(byte_chars()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert all(ch in vocab for ch in byte_chars())
    assert tok.unk_token is None


def test_byte_tokenizer_ids_are_the_utf8_bytes() -> None:
    tok = byte_tokenizer()
    assert tok.vocab_size == 259 == min_vocab_size()
    text = "Aé東🙂\n\x00"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert [tok.token_to_id(s) for s in DEFAULT_SPECIALS] == [256, 257, 258]


def test_lone_surrogates_become_replacement_characters(tok: Tokenizer) -> None:
    bad = "a\ud83db \udc80c"  # a lone high and a lone low surrogate (bad JSON escapes)
    assert tok.encode(bad) == tok.encode("a\ufffdb \ufffdc")
    assert tok.decode(tok.encode(bad)) == "a\ufffdb \ufffdc"
    assert tok.encode("\ud83d\ude42") == tok.encode("🙂")  # a split pair is joined back
    assert tok.encode_batch(["ok", bad]) == [tok.encode("ok"), tok.encode(bad)]


def test_training_reads_lone_surrogates_as_replacement_characters() -> None:
    dirty = train_bpe(["caf\udce9 \ud83d!"] * 5 + MIXED_CORPUS, vocab_size=500)
    clean = train_bpe(["caf\ufffd \ufffd!"] * 5 + MIXED_CORPUS, vocab_size=500)
    assert dirty.backend.to_str() == clean.backend.to_str()


# ---------------------------------------------------------------------------------------------
# Vocabulary, special tokens, chat


def test_vocab_size_too_small_names_the_flag_and_the_minimum() -> None:
    with pytest.raises(LmforgeError, match=r"--vocab-size 258 .*at least 259") as info:
        train_bpe(["abc"], vocab_size=258)
    assert "\n" not in str(info.value)
    with pytest.raises(LmforgeError, match="at least 257"):
        train_bpe(["abc"], vocab_size=100, special_tokens=["<eos>"])


def test_smallest_vocab_has_no_merges_and_still_round_trips() -> None:
    tok = train_bpe(["aaaa bbbb"] * 10, vocab_size=259)
    assert tok.vocab_size == 259
    assert tok.decode(tok.encode("aaaa 東")) == "aaaa 東"
    assert len(tok.encode("aaaa")) == 4


def test_merges_are_learned_and_compress(bpe: Tokenizer) -> None:
    assert 400 < bpe.vocab_size <= 600
    text = MIXED_CORPUS[0]
    assert len(bpe.encode(text)) < len(text.encode("utf-8")) / 2


def test_special_tokens_are_single_tokens_and_eos_is_pad(tok: Tokenizer) -> None:
    ids = [special_id(tok, s) for s in DEFAULT_SPECIALS]
    assert tok.eos_token == tok.pad_token == tok.bos_token == "<|endoftext|>"
    assert tok.eos_id == tok.pad_id == ids[0]
    text = "one<|endoftext|>two <|im_start|>user\nhi<|im_end|>"
    encoded = tok.encode(text)
    for tid in ids:
        assert encoded.count(tid) == 1
    assert tok.decode(encoded, skip_special_tokens=False) == text
    assert tok.decode(encoded) == "onetwo user\nhi"


def test_chatml_renders_and_encodes(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "Hi 🙂"}, {"role": "assistant", "content": "Hey"}]
    assert tok.chat_template == CHATML_TEMPLATE
    text = tok.render_chat(messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>user\nHi 🙂<|im_end|>\n<|im_start|>assistant\nHey<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok.encode_chat(messages)
    assert ids[0] == special_id(tok, "<|im_start|>")
    assert ids.count(special_id(tok, "<|im_end|>")) == 2
    assert tok.decode(ids, skip_special_tokens=False) == text


# ---------------------------------------------------------------------------------------------
# Training: streaming and determinism


def test_training_consumes_a_one_shot_generator() -> None:
    consumed = []

    def corpus() -> Iterator[str]:
        for text in MIXED_CORPUS:
            consumed.append(len(text))
            yield text

    from_gen = train_bpe(corpus(), vocab_size=500)
    from_list = train_bpe(MIXED_CORPUS, vocab_size=500)
    assert len(consumed) == len(MIXED_CORPUS)
    assert from_gen.backend.to_str() == from_list.backend.to_str()


TRAIN_SCRIPT = """
import hashlib, json, sys
from lmforge.tokenizer.bpe import train_bpe
corpus = json.loads(sys.stdin.read())
print(hashlib.sha256(train_bpe(corpus, vocab_size=600).backend.to_str().encode()).hexdigest())
"""


def test_training_is_deterministic_across_processes_and_threads(bpe: Tokenizer) -> None:
    """Same corpus and options → identical tokenizer.json, whatever the thread count or hash
    seed (the trainer breaks count ties by pair ids, not by hash order)."""
    again = train_bpe(MIXED_CORPUS, vocab_size=600)
    assert again.backend.to_str() == bpe.backend.to_str()
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "PYTHONHASHSEED": "123"}
    out = subprocess.run(
        [sys.executable, "-c", TRAIN_SCRIPT],
        input=json.dumps(MIXED_CORPUS),
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert out.stdout.strip() == hashlib.sha256(bpe.backend.to_str().encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Files: our loader and transformers


def test_save_load_and_transformers_give_the_same_ids(tok: Tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok.save(tmp_path)
    back = Tokenizer.load(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    hf_file = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    samples = [*random_texts(seed=2, n=40), *MIXED_CORPUS, "x<|endoftext|>y<|im_start|>"]
    for text in samples:
        ids = tok.encode(text)
        assert back.encode(text) == ids
        assert hf(text)["input_ids"] == ids
        assert hf_file(text)["input_ids"] == ids
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)
    assert back.backend.to_str() == tok.backend.to_str()
    assert (back.bos_token, back.eos_token, back.pad_token) == ("<|endoftext|>",) * 3
    assert (hf.eos_token_id, hf.pad_token_id) == (tok.eos_id, tok.pad_id)
    assert back.chat_template == tok.chat_template
    messages = [{"role": "user", "content": "Hi"}]
    rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == tok.render_chat(messages)
    assert hf(rendered, add_special_tokens=False)["input_ids"] == tok.encode_chat(messages)
