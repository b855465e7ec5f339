"""Character-level tokenizers, compatible with nanoGPT's `shakespeare_char`.

The vocabulary is `sorted(set(all characters))`: id i is the i-th character in code-point
order, exactly nanoGPT's `stoi` (karpathy/nanoGPT `data/shakespeare_char/prepare.py`), so
tinyshakespeare gives 65 tokens and no special tokens unless asked for. Every code point is one
token: '\\n', ' ', a CJK ideograph, an emoji; a ZWJ emoji sequence is several tokens.

It is a Hugging Face `tokenizers` model (WordLevel over single characters, a pre-tokenizer that
isolates each character, a decoder that concatenates), so it saves as a tokenizer.json that
`Tokenizer.load` and transformers' `PreTrainedTokenizerFast` read. That path costs about one
microsecond per character; `CharEncoder` encodes the same ids ~25× faster with a numpy lookup.

A character outside the vocabulary is an error that names it (`LmforgeError`), never a silent
drop or an unknown token: `lmforge data prepare` builds the vocabulary from the very corpus it
encodes, so it cannot happen there, and elsewhere it means the wrong tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import LmforgeError
from lmforge.tokenizer.tokenizer import Tokenizer, replace_surrogates

log = logging.getLogger(__name__)

# One match per code point, newlines included (Oniguruma's `.` stops at '\n').
EACH_CHARACTER = r"[\s\S]"
# WordLevel needs an unknown token's name; it is never in the vocabulary (a vocabulary of single
# characters cannot hold a 5-character string), so an unknown character raises instead.
_ABSENT_UNK = "<unk>"


def train_char(texts: Iterable[str], *, special_tokens: Sequence[str] = ()) -> Tokenizer:
    """A character tokenizer over every character in TEXTS (streamed: only the set is kept).

    Lone surrogates in TEXTS count as U+FFFD, as `Tokenizer.encode` reads them.
    """
    chars: set[str] = set()
    for text in texts:
        part = set(text)
        if part <= chars:
            continue
        if any("\ud800" <= ch <= "\udfff" for ch in part):
            part = set(replace_surrogates(text))
        chars |= part
    if not chars:
        raise LmforgeError("no text to build a character vocabulary from")
    tokenizer = char_tokenizer(sorted(chars), special_tokens=special_tokens)
    log.info("built a character vocabulary of %d characters", len(chars))
    return tokenizer


def char_tokenizer(chars: Sequence[str], *, special_tokens: Sequence[str] = ()) -> Tokenizer:
    """A character tokenizer with id i = CHARS[i] (e.g. nanoGPT's `itos`), specials after.

    The first special token, if any, is eos and pad.
    """
    if isinstance(special_tokens, str):
        raise LmforgeError("special_tokens must be a sequence of strings, not one string")
    bad = [ch for ch in chars if len(ch) != 1 or "\ud800" <= ch <= "\udfff"]
    if bad:
        raise LmforgeError(f"a character vocabulary holds single code points, not {bad[0]!r}")
    alphabet = set(chars)
    if len(alphabet) != len(chars):
        raise LmforgeError("a character vocabulary must not repeat a character")
    overlap = [s for s in special_tokens if s in alphabet]
    if overlap or len(set(special_tokens)) != len(special_tokens) or not all(special_tokens):
        raise LmforgeError(f"special tokens must be distinct, new and non-empty: {special_tokens}")
    backend = HFTokenizer(
        models.WordLevel(vocab={ch: i for i, ch in enumerate(chars)}, unk_token=_ABSENT_UNK)
    )
    backend.pre_tokenizer = pre_tokenizers.Split(
        Regex(EACH_CHARACTER), behavior="isolated", invert=False
    )
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(special_tokens))
    eos = special_tokens[0] if special_tokens else None
    return Tokenizer(backend=backend, eos_token=eos, pad_token=eos)


def is_char_tokenizer(tokenizer: Tokenizer) -> bool:
    """Whether TOKENIZER is character-level (as built here), so `CharEncoder` applies."""
    if not isinstance(tokenizer.backend.model, models.WordLevel):
        return False
    return all(len(tok) == 1 for tok in tokenizer.backend.get_vocab(with_added_tokens=False))


class CharEncoder:
    """Text → ids for a character tokenizer by a numpy table lookup: the fast path for corpora.

    Gives the ids of `Tokenizer.encode` (tested), except that special-token strings in the
    text are not matched (they are read as characters); ids come back as an int32 array.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        if not is_char_tokenizer(tokenizer):
            raise LmforgeError("CharEncoder needs a character-level tokenizer")
        self.vocab = tokenizer.backend.get_vocab(with_added_tokens=False)
        top = max((ord(ch) for ch in self.vocab), default=0)
        # Indexed by code point; -1 marks a character outside the vocabulary, and the last
        # entry catches every code point above the highest one (np.take clips to it).
        self.table = np.full(top + 2, -1, dtype=np.int32)
        for ch, tid in self.vocab.items():
            self.table[ord(ch)] = tid

    def __call__(self, text: str) -> np.ndarray:
        try:
            raw = text.encode("utf-32-le")
        except UnicodeEncodeError:  # lone surrogates → U+FFFD, as Tokenizer.encode does
            text = replace_surrogates(text)
            raw = text.encode("utf-32-le")
        codes = np.frombuffer(raw, dtype=np.uint32)  # one per character: text[i] is codes[i]
        ids = np.take(self.table, codes, mode="clip")
        if ids.size and ids.min() < 0:
            ch = text[int(np.argmax(ids < 0))]
            raise LmforgeError(
                f"character {ch!r} (U+{ord(ch):04X}) is not in the tokenizer's vocabulary of "
                f"{len(self.vocab)} characters"
            )
        return ids
