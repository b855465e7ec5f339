"""The tokenizer stored in a GGUF file's metadata, rebuilt as a Hugging Face `tokenizers` one.

GGUF keeps the vocabulary (`tokenizer.ggml.tokens`), token types, BPE merges, special-token ids
and the chat template; the pre-tokenizer is named (`tokenizer.ggml.pre`) and its regex lives in
llama.cpp (`llama-vocab.cpp`). We map the names we know to `tokenizers` pre-tokenizers.
Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) are supported so far.

The way back — a Tokenizer as the metadata llama.cpp reads (`gguf_vocab`, used by
`model/gguf_export.py`) — is here too, since it must know the tokenizer's internals.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import LmforgeError
from lmforge.tokenizer.bpe import SPLIT_PATTERN
from lmforge.tokenizer.chat import CHATML_TEMPLATE
from lmforge.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# llama.cpp token types (gguf.TokenType): 3 = control (special), 4 = user defined (added).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split(regex: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def pre_tokenizer_for(name: str) -> pre_tokenizers.PreTokenizer:
    """The `tokenizers` pre-tokenizer equivalent to llama.cpp's pre-tokenizer NAME."""
    if name == "smollm":  # digits split one by one, then GPT-2's regex
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if name in ("llama-bpe", "llama3", "smaug-bpe", "dbrx"):
        return _split(LLAMA3_REGEX)
    if name == "qwen2":
        return _split(QWEN2_REGEX)
    if name not in ("gpt-2", "gpt2", "default", ""):
        log.warning("unknown GGUF pre-tokenizer %r, using GPT-2's", name)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def tokenizer_from_gguf_fields(meta: dict[str, Any], source: str) -> Tokenizer:
    """Build a Tokenizer from GGUF metadata META (key → decoded value) read from SOURCE."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise LmforgeError(f"{source} has no tokenizer in its metadata")
    if kind != "gpt2":
        raise LmforgeError(
            f"{source}: GGUF tokenizer model {kind!r} is not supported yet (only byte-level BPE)"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = HFTokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    )
    backend.pre_tokenizer = pre_tokenizer_for(str(meta.get("tokenizer.ggml.pre", "default")))
    backend.decoder = decoders.ByteLevel()
    added = [
        AddedToken(tok, special=t == TOKEN_TYPE_CONTROL, normalized=False)
        for tok, t in zip(tokens, types, strict=True)
        if t in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
    ]
    backend.add_tokens(added)

    def special(key: str) -> str | None:
        tid = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(tid)] if tid is not None and 0 <= int(tid) < len(tokens) else None

    bos = special("bos")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    ctx = meta.get("llama.context_length")
    return Tokenizer(
        backend=backend,
        bos_token=bos,
        eos_token=special("eos"),
        pad_token=special("padding"),
        unk_token=special("unknown"),
        chat_template=meta.get("tokenizer.chat_template"),
        model_max_length=int(ctx) if ctx else None,
    )


# ---------------------------------------------------------------------------------------------
# Export: a Tokenizer → the metadata llama.cpp reads (the inverse of `tokenizer_from_gguf_fields`)

TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNUSED = 5


@dataclass(frozen=True)
class GGUFVocab:
    """A byte-level BPE tokenizer as GGUF metadata holds it, laid out as llama.cpp's
    convert_hf_to_gguf.py `_set_vocab_gpt2` writes it: one token per model vocabulary row
    (`[PAD<i>]`, type UNUSED, for rows the tokenizer lacks), merges as "a b" strings."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str  # llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`)
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str


def gguf_vocab(tokenizer: Tokenizer, vocab_size: int, source: str) -> GGUFVocab:
    """TOKENIZER as GGUF metadata for a model with VOCAB_SIZE embedding rows.

    Only byte-level BPE tokenizers can be written (llama.cpp's `gpt2` tokenizer model); anything
    else is a one-line LmforgeError naming SOURCE. Where llama.cpp has no exact equivalent of
    the pre-tokenizer, the closest one is chosen and a warning says how they differ
    (`gguf_pre_tokenizer`).
    """
    backend = tokenizer.backend
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    decoder = spec.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        kind = f"{model.get('type')} with a {decoder.get('type')} decoder"
        raise LmforgeError(
            f"{source}: GGUF export needs a byte-level BPE tokenizer (llama.cpp's gpt2 model); "
            f"this one is {kind}"
        )
    if tokenizer.vocab_size > vocab_size:
        raise LmforgeError(
            f"{source}: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
            f"{vocab_size} embedding rows"
        )
    if spec.get("normalizer"):
        log.warning(
            "%s: llama.cpp applies no normalizer for BPE; the tokenizer's %s normalizer is lost",
            source,
            spec["normalizer"].get("type"),
        )
    added = {int(i): tok for i, tok in backend.get_added_tokens_decoder().items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        tok = backend.id_to_token(i)
        if tok is None:  # the model's vocabulary is padded past the tokenizer's
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_TYPE_UNUSED)
        else:
            tokens.append(tok)
            if i in added:
                types.append(TOKEN_TYPE_CONTROL if added[i].special else TOKEN_TYPE_USER_DEFINED)
            else:
                types.append(TOKEN_TYPE_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    add_bos, add_eos = _added_specials(tokenizer, source)
    return GGUFVocab(
        tokens=tokens,
        token_types=types,
        merges=merges,
        pre=gguf_pre_tokenizer(spec.get("pre_tokenizer"), source),
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        unk_id=tokenizer.token_to_id(tokenizer.unk_token),
        add_bos=add_bos,
        add_eos=add_eos,
        # lmforge renders ChatML for a tokenizer without a template; say so to llama.cpp too.
        chat_template=tokenizer.chat_template or CHATML_TEMPLATE,
    )


def gguf_pre_tokenizer(pre: dict[str, Any] | None, source: str) -> str:
    """llama.cpp's name for the `tokenizers` pre-tokenizer PRE (its tokenizer.json form).

    llama.cpp cannot take a regex from the file: it knows a fixed list of names, each with its
    regexes in `llama-vocab.cpp`, and refuses a name it does not know. Exact matches:

    - ByteLevel(use_regex=True)                      → "gpt-2"     (GPT-2's regex)
    - Digits(individual) + ByteLevel(use_regex=True) → "smollm"    (SmolLM/SmolLM2, StarCoder)
    - Split(Llama-3 regex) + ByteLevel               → "llama-bpe"
    - Split(Qwen2 regex) + ByteLevel                 → "qwen2"

    lmforge's own BPE (`tokenizer/bpe.py` SPLIT_PATTERN) is Llama 3's regex except that runs of
    Han/kana are cut into words of at most 2 characters (and never take a leading space or
    punctuation); the closest llama.cpp pre-tokenizer is "llama-bpe". Both give the same ids on
    text without Han or kana; a run of 3 or more such characters may be tokenized differently
    (merges that lmforge never applies across its 2-character cuts can apply in llama.cpp).
    llama.cpp also takes a word that is itself a token whole for "llama-bpe" (`ignore_merges`),
    which a trained BPE almost always does anyway. Any other byte-level split falls back to
    "gpt-2" with a warning.
    """
    pre = pre or {}
    listed = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    parts: list[dict[str, Any]] = [p for p in listed or [] if p]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        name = "gpt-2"
    elif kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        name = "smollm"
    elif kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        exact = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}
        if regex in exact:
            name = exact[regex]
        elif regex == SPLIT_PATTERN:
            name = "llama-bpe"
            log.info(
                "%s: lmforge's BPE split written as llama.cpp's 'llama-bpe' (the same except "
                "on runs of 3+ Han/kana characters)",
                source,
            )
        else:
            name = "gpt-2"
            log.warning("%s: llama.cpp has no pre-tokenizer with this regex; using 'gpt-2'", source)
    elif "ByteLevel" in kinds:
        name = "gpt-2"
        log.warning("%s: llama.cpp has no pre-tokenizer like %s; using 'gpt-2'", source, kinds)
    else:
        raise LmforgeError(
            f"{source}: GGUF export needs a byte-level pre-tokenizer, this tokenizer has {kinds}"
        )
    if any(p.get("type") == "ByteLevel" and p.get("add_prefix_space") for p in parts):
        log.warning("%s: llama.cpp adds no prefix space; the tokenizer's one is lost", source)
    return name


def _added_specials(tokenizer: Tokenizer, source: str) -> tuple[bool, bool]:
    """(adds BOS, adds EOS): what the post-processor puts around an encoded text."""
    probe = "a"
    plain = tokenizer.encode(probe, add_special_tokens=False)
    full = tokenizer.encode(probe, add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            before, after = full[:start], full[start + len(plain) :]
            break
    else:
        before, after = [], []
    add_bos = bool(before) and before == [tokenizer.bos_id]
    add_eos = bool(after) and after == [tokenizer.eos_id]
    if (before and not add_bos) or (after and not add_eos):
        log.warning(
            "%s: the tokenizer adds %s around a text; GGUF can say only 'add BOS' / 'add EOS'",
            source,
            [before, after],
        )
    return add_bos, add_eos
