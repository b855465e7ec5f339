"""The tokenizer stored in a GGUF file's metadata, rebuilt as a Hugging Face `tokenizers` one.

GGUF keeps the vocabulary (`tokenizer.ggml.tokens`), token types, BPE merges, special-token ids
and the chat template; the pre-tokenizer is named (`tokenizer.ggml.pre`) and its regex lives in
llama.cpp (`llama-vocab.cpp`). We map the names we know to `tokenizers` pre-tokenizers.
Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) are supported so far.
"""

from __future__ import annotations

import logging
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import LmforgeError
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
