"""Byte-level tokenizers the data stage builds: a trained BPE (`train_bpe`) and raw bytes.

Both follow GPT-2 / Llama-3: no normalizer, a regex split into words, then the ByteLevel
pre-tokenizer maps every UTF-8 byte to a printable character, so all 256 bytes are in the
vocabulary, nothing ever encodes to an unknown token and `decode(encode(x)) == x` exactly.
Special tokens (`DEFAULT_SPECIALS`): `<|endoftext|>` ends every document in the shards and is
the eos, bos and pad token; `<|im_start|>` and `<|im_end|>` frame ChatML turns.

Training streams: `texts` may be a generator over a corpus of any size. The trainer keeps one
count per distinct pre-tokenized word, never the corpus, and the result is deterministic
(same corpus and options → byte-identical tokenizer.json; tests/tokenizer/test_bpe.py).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Iterator, Sequence

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import LmforgeError
from lmforge.tokenizer.chat import CHATML_TEMPLATE
from lmforge.tokenizer.tokenizer import Tokenizer, replace_surrogates

log = logging.getLogger(__name__)

DEFAULT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# The word split of Llama 3 / GPT-4's cl100k (contractions, letters with one leading
# non-letter, numbers of at most 3 digits, punctuation runs, newlines, other whitespace),
# https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/tokenizer.json — except that runs
# of Han, hiragana and katakana, which have no spaces, are cut into words of at most 2
# characters. Uncut, every Chinese clause is a distinct "word", and the trainer, which keeps
# every distinct word and its pair positions, needs ~100 bytes of memory per byte of Chinese
# text (2.4 GB for 20 MB); cut, the distinct words are bounded by the distinct character pairs.
# Tokens can still span two characters (most Chinese words are one or two).
_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}"
SPLIT_PATTERN = (
    rf"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[{_CJK}]{{1,2}}|[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}&&[^{_CJK}]]+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SURROGATE = re.compile("[\ud800-\udfff]")


def byte_chars() -> list[str]:
    """GPT-2's byte → character map: entry b is the character the ByteLevel step writes for b.

    Printable Latin-1 bytes stand for themselves; the other 68 are shifted to U+0100.. so no
    token contains whitespace or control characters. (openai/gpt-2 `encoder.py`
    `bytes_to_unicode`.)
    """
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, shifted = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(0x100 + shifted))
            shifted += 1
    return chars


def min_vocab_size(special_tokens: Sequence[str] = DEFAULT_SPECIALS) -> int:
    """The smallest byte-level vocabulary: 256 bytes and the special tokens."""
    return 256 + len(_checked_specials(special_tokens))


def check_vocab_size(vocab_size: int, special_tokens: Sequence[str] = DEFAULT_SPECIALS) -> None:
    """Raise `LmforgeError` naming --vocab-size if it cannot hold the bytes and special tokens."""
    minimum = min_vocab_size(special_tokens)
    if vocab_size < minimum:
        raise LmforgeError(
            f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {minimum} "
            f"(256 bytes + {minimum - 256} special tokens)"
        )


def train_bpe(
    texts: Iterable[str],
    *,
    vocab_size: int,
    special_tokens: Sequence[str] = DEFAULT_SPECIALS,
    min_frequency: int = 2,
    show_progress: bool = False,
    length: int | None = None,
) -> Tokenizer:
    """Train a byte-level BPE of at most VOCAB_SIZE tokens on TEXTS (streamed, not held).

    Special tokens take ids 0.., then the 256 bytes, then the merges in the order learned. The
    first special token is eos/bos/pad. `length` is the number of texts, for the progress bar.
    Fewer than VOCAB_SIZE tokens result when no more pairs occur `min_frequency` times. Lone
    surrogates in TEXTS count as U+FFFD, as `Tokenizer.encode` reads them.
    """
    specials = _checked_specials(special_tokens)
    check_vocab_size(vocab_size, specials)
    if min_frequency < 1:
        raise LmforgeError(f"min_frequency must be at least 1, got {min_frequency}")
    backend = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    start = time.perf_counter()
    backend.train_from_iterator(_encodable(texts), trainer=trainer, length=length)
    size = backend.get_vocab_size(with_added_tokens=True)
    log.info("trained a byte-level BPE of %d tokens in %.1fs", size, time.perf_counter() - start)
    if size < vocab_size:
        log.warning(
            "the BPE has %d tokens, fewer than --vocab-size %d: no more pairs occur %d times",
            size,
            vocab_size,
            min_frequency,
        )
    return _wrap(backend, specials)


def byte_tokenizer(special_tokens: Sequence[str] = DEFAULT_SPECIALS) -> Tokenizer:
    """Raw UTF-8 bytes: byte b is id b, then the special tokens (vocab 259 by default)."""
    specials = _checked_specials(special_tokens)
    vocab = {ch: b for b, ch in enumerate(byte_chars())}
    backend = _byte_level(models.BPE(vocab=vocab, merges=[]))
    backend.add_special_tokens(list(specials))
    return _wrap(backend, specials)


def _encodable(texts: Iterable[str]) -> Iterator[str]:
    """TEXTS with lone surrogates as U+FFFD, as `Tokenizer.encode` reads them (Rust takes only
    valid UTF-8). The search runs at ~200 MB/s, and not at all on ASCII texts."""
    for text in texts:
        if not text.isascii() and _SURROGATE.search(text):
            text = replace_surrogates(text)
        yield text


def _byte_level(model: models.Model) -> HFTokenizer:
    """A backend with the GPT-2/Llama-3 pre-tokenizer and decoder around MODEL."""
    backend = HFTokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _checked_specials(special_tokens: Sequence[str]) -> tuple[str, ...]:
    if isinstance(special_tokens, str):
        raise LmforgeError("special_tokens must be a sequence of strings, not one string")
    specials = tuple(special_tokens)
    if len(set(specials)) != len(specials) or not all(specials):
        raise LmforgeError(f"special tokens must be distinct non-empty strings: {specials!r}")
    return specials


def _wrap(backend: HFTokenizer, specials: tuple[str, ...]) -> Tokenizer:
    eos = specials[0] if specials else None
    chatml = "<|im_start|>" in specials and "<|im_end|>" in specials
    return Tokenizer(
        backend=backend,
        bos_token=eos,
        eos_token=eos,
        pad_token=eos,
        chat_template=CHATML_TEMPLATE if chatml else None,
    )
