"""The tokenizer stored in a GGUF file's metadata, rebuilt as a Hugging Face `tokenizers` one.

GGUF keeps the vocabulary (`tokenizer.ggml.tokens`), token types, BPE merges or SentencePiece
scores, special-token ids and the chat template; the pre-tokenizer is only named
(`tokenizer.ggml.pre`), its regexes live in llama.cpp (`llama-vocab.cpp`). The rebuilt
tokenizer must give llama.cpp's ids, so anything it cannot reproduce is refused with one
LmforgeError line naming the field, not approximated (one exception, with a warning: the BPE
pre-tokenizer "default", read as GPT-2's, see `_APPROXIMATE`):

- `tokenizer.ggml.model == "gpt2"`: byte-level BPE, here, for the pre-tokenizer names in
  `PRE_TOKENIZERS` (GPT-2, SmolLM/StarCoder, Llama 3 / SmolLM3, DBRX / OLMo 2, Qwen 2–3,
  Qwen 3.5 and the names llama.cpp gives the same regex);
- `tokenizer.ggml.model == "llama"`: SentencePiece-style (Llama 2, Mistral v0.1, Phi-3,
  Gemma 1–3) in `gguf_spm.py`.

In both, control, user-defined and unknown tokens are cut out of the text first, as llama.cpp's
`tokenizer_st_partition` does, and BOS/EOS are added as `add_bos_token` / `add_eos_token` say
(llama.cpp's defaults when absent).

The way back — a Tokenizer as the metadata llama.cpp reads (`gguf_vocab`, used by
`model/formats/gguf_write.py`) — is here too, since it must know the tokenizer's internals.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import LmforgeError
from lmforge.tokenizer.bpe import SPLIT_PATTERN
from lmforge.tokenizer.chat import CHATML_TEMPLATE
from lmforge.tokenizer.gguf_spm import (
    PARTITIONED,
    check_special_overlaps,
    is_spm,
    spm_fields,
    spm_template,
    spm_tokenizer,
    wrap_gguf_tokenizer,
)
from lmforge.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# llama.cpp token types (gguf.TokenType): 3 = control (special), 4 = user defined (added).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# The regexes of llama.cpp's pre-tokenizers (src/llama-vocab.cpp, `llm_tokenizer_bpe`), as
# llama.cpp spells them: contractions as `'[sS]`, not `(?i:'s)`, which in Oniguruma also matches
# case-folded non-ASCII letters (the long s "ſ" folds to "s").
GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}" + _TAIL
QWEN2_REGEX = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}" + _TAIL
QWEN35_REGEX = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    + r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The same splits as Hugging Face tokenizer.json files spell them (Llama 3's, Qwen 2's).
HF_LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}" + _TAIL
HF_QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}" + _TAIL


def _byte_level() -> pre_tokenizers.PreTokenizer:
    """GPT-2's regex, then bytes → characters (ByteLevel's own regex is GPT-2's)."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    """Every digit alone (llama.cpp's `\\p{N}` split), then GPT-2's regex."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _split(regex: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    def build() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    return build


@dataclass(frozen=True)
class PreTokenizer:
    """What llama.cpp does for one `tokenizer.ggml.pre` name (`llama_vocab::impl::load`)."""

    build: Callable[[], pre_tokenizers.PreTokenizer]
    ignore_merges: bool = False  # a word that is itself a token is taken whole
    add_bos: bool = False  # llama.cpp's default when `tokenizer.ggml.add_bos_token` is absent


_GPT2 = PreTokenizer(_byte_level)
_STARCODER = PreTokenizer(_digits_then_gpt2)
_LLAMA3 = PreTokenizer(_split(LLAMA3_REGEX), ignore_merges=True, add_bos=True)
_DBRX = PreTokenizer(_split(LLAMA3_REGEX))
_QWEN2 = PreTokenizer(_split(QWEN2_REGEX))
# The names llama.cpp maps to these regexes and nothing else that changes the ids (no added SEP,
# no special BOS handling). SmolLM3 files say "llama-bpe", Qwen 3 "qwen2", OLMo 2 "dbrx".
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    **dict.fromkeys(
        [
            "gpt-2",
            "gpt2",
            "phi-2",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "gigachat",
            "a.x-4.0",
            "exaone4",
        ],
        _GPT2,
    ),
    **dict.fromkeys(
        ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"],
        _STARCODER,
    ),
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"],
        _LLAMA3,
    ),
    **dict.fromkeys(["dbrx", "smaug-bpe"], _DBRX),
    **dict.fromkeys(
        ["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "stablelm2", "hunyuan", "megrez"],
        _QWEN2,
    ),
    "qwen35": PreTokenizer(_split(QWEN35_REGEX)),
}
# llama.cpp's "default" BPE split is four regexes in turn (punctuation runs, GPT-2's, digit runs,
# digit triples); lmforge has always read it as GPT-2's, and tests/model/test_gguf.py writes its
# GPT-2-split test vocabulary as "default". They differ on punctuation after a space and on
# numbers. Kept, with a warning, until that test writes "gpt-2".
_APPROXIMATE = {"default": _GPT2, "": _GPT2}
# llama.cpp's defaults for a `gpt2` vocabulary without the ids (llama_vocab::impl::load).
_BPE_DEFAULT_IDS = {"bos": 11, "eos": 11}


def pre_tokenizer_for(name: str) -> pre_tokenizers.PreTokenizer:
    """The `tokenizers` pre-tokenizer equivalent to llama.cpp's pre-tokenizer NAME."""
    return _pre_tokenizer(name, "GGUF").build()


def _pre_tokenizer(name: str, source: str) -> PreTokenizer:
    if name in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[name]
    if name in _APPROXIMATE:
        log.warning(
            "%s: tokenizer.ggml.pre %r read as GPT-2's split (llama.cpp's 'default' also "
            "isolates punctuation and cuts numbers into 3-digit groups)",
            source,
            name,
        )
        return _APPROXIMATE[name]
    raise LmforgeError(
        f"{source}: tokenizer.ggml.pre {name!r} is not supported (supported: "
        f"{', '.join(sorted(PRE_TOKENIZERS))})"
    )


def tokenizer_from_gguf_fields(meta: dict[str, Any], source: str) -> Tokenizer:
    """Build a Tokenizer from GGUF metadata META (key → decoded value) read from SOURCE.

    `tokenizer.ggml.model` "gpt2" (byte-level BPE) and "llama" (SentencePiece-style) are
    supported; anything llama.cpp would tokenize differently is a one-line LmforgeError.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
        raise LmforgeError(f"{source} has no tokenizer in its metadata")
    if kind == "llama":
        return spm_tokenizer(meta, source)
    if kind != "gpt2":
        raise LmforgeError(
            f"{source}: tokenizer.ggml.model {kind!r} is not supported (supported: gpt2, llama)"
        )
    pre = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "")), source)
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [p for m in meta.get("tokenizer.ggml.merges", []) if (p := _merge_pair(m))]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    try:
        model = models.BPE(
            vocab=vocab,
            merges=merges,
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=pre.ignore_merges,
        )
    except Exception as exc:  # a merge of tokens the vocabulary lacks
        raise LmforgeError(f"{source}: tokenizer.ggml.merges: {exc}") from None
    backend = HFTokenizer(model)
    backend.pre_tokenizer = pre.build()
    backend.decoder = decoders.ByteLevel()
    specials = [(tok, t) for tok, t in zip(tokens, types, strict=True) if t in PARTITIONED]
    check_special_overlaps([tok for tok, _ in specials], source)
    backend.add_tokens(
        [
            AddedToken(tok, special=t != TOKEN_TYPE_USER_DEFINED, normalized=False)
            for tok, t in specials
        ]
    )

    def special_id(key: str) -> int | None:
        tid = meta.get(f"tokenizer.ggml.{key}_token_id", _BPE_DEFAULT_IDS.get(key))
        return int(tid) if tid is not None and 0 <= int(tid) < len(tokens) else None

    ids = {key: special_id(key) for key in ("bos", "eos", "unknown", "padding")}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", pre.add_bos))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    template = spm_template(
        tokens, ids["bos"] if add_bos else None, ids["eos"] if add_eos else None
    )
    backend.post_processor = template or processors.ByteLevel(trim_offsets=False)
    return wrap_gguf_tokenizer(backend, meta, tokens, ids)


def _merge_pair(merge: str) -> tuple[str, str] | None:
    """The pair in merge "a b", cut at the first space after the first character as llama.cpp
    does; None for a merge without one (llama.cpp keeps it as a pair of empty strings that
    never matches)."""
    cut = merge.find(" ", 1)
    return (merge[:cut], merge[cut + 1 :]) if cut > 0 else None


# ---------------------------------------------------------------------------------------------
# Export: a Tokenizer → the metadata llama.cpp reads (the inverse of `tokenizer_from_gguf_fields`)

TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNUSED = 5


@dataclass(frozen=True)
class GGUFVocab:
    """A tokenizer as GGUF metadata holds it, laid out as llama.cpp's convert_hf_to_gguf.py
    writes it: one token per model vocabulary row (`[PAD<i>]`, type UNUSED, for rows the
    tokenizer lacks). Byte-level BPE (`model` "gpt2", `_set_vocab_gpt2`) has merges as "a b"
    strings; SentencePiece-style (`model` "llama", `_set_vocab_sentencepiece`) has a score per
    token instead. `write_to` writes it."""

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
    model: str = "gpt2"  # `tokenizer.ggml.model`
    scores: list[float] | None = None  # SPM only
    add_space_prefix: bool = False  # SPM only: a "▁" before each piece of text

    def write_to(self, writer: Any) -> None:
        """Every tokenizer key into WRITER (a `gguf.GGUFWriter`), in convert_hf_to_gguf order."""
        writer.add_add_space_prefix(self.add_space_prefix)
        writer.add_add_bos_token(self.add_bos)  # always written: llama.cpp's default varies
        writer.add_add_eos_token(self.add_eos)
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        if self.model == "gpt2":
            writer.add_token_merges(self.merges)
        for key, tid in (
            ("bos", self.bos_id),
            ("eos", self.eos_id),
            ("unk", self.unk_id),
            ("pad", self.pad_id),
        ):
            if tid is not None:
                getattr(writer, f"add_{key}_token_id")(tid)
        writer.add_chat_template(self.chat_template)


def gguf_vocab(tokenizer: Tokenizer, vocab_size: int, source: str) -> GGUFVocab:
    """TOKENIZER as GGUF metadata for a model with VOCAB_SIZE embedding rows.

    Byte-level BPE tokenizers are written as llama.cpp's `gpt2` model; where llama.cpp has no
    exact equivalent of the pre-tokenizer, the closest one is chosen and a warning says how they
    differ (`gguf_pre_tokenizer`). SentencePiece-style ones (BPE with byte fallback and a "▁"
    normalizer: Llama 2's, Gemma's, or one read from a `llama` GGUF) are written as the `llama`
    model, exactly or not at all (`gguf_spm.spm_fields`). Anything else is a one-line
    LmforgeError naming SOURCE.
    """
    backend = tokenizer.backend
    spec = json.loads(backend.to_str())
    if is_spm(spec):
        return _spm_vocab(tokenizer, vocab_size, source)
    model = spec.get("model") or {}
    decoder = spec.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        kind = f"{model.get('type')} with a {decoder.get('type')} decoder"
        raise LmforgeError(
            f"{source}: GGUF export needs a byte-level BPE tokenizer (llama.cpp's gpt2 model) "
            f"or a SentencePiece-style one (its llama model); this one is {kind}"
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
        pre=gguf_pre_tokenizer(
            spec.get("pre_tokenizer"), source, ignore_merges=bool(model.get("ignore_merges"))
        ),
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        unk_id=tokenizer.token_to_id(tokenizer.unk_token),
        add_bos=add_bos,
        add_eos=add_eos,
        # lmforge renders ChatML for a tokenizer without a template; say so to llama.cpp too.
        chat_template=tokenizer.chat_template or CHATML_TEMPLATE,
    )


def _spm_vocab(tokenizer: Tokenizer, vocab_size: int, source: str) -> GGUFVocab:
    tokens, scores, types, add_space_prefix = spm_fields(tokenizer, vocab_size, source)
    add_bos, add_eos = _added_specials(tokenizer, source)
    unk = tokenizer.token_to_id(tokenizer.unk_token)
    return GGUFVocab(
        tokens=tokens,
        token_types=types,
        merges=[],
        pre="default",
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        unk_id=unk,
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=tokenizer.chat_template or CHATML_TEMPLATE,
        model="llama",
        scores=scores,
        add_space_prefix=add_space_prefix,
    )


def gguf_pre_tokenizer(
    pre: dict[str, Any] | None, source: str, *, ignore_merges: bool = True
) -> str:
    """llama.cpp's name for the `tokenizers` pre-tokenizer PRE (its tokenizer.json form).

    llama.cpp cannot take a regex from the file: it knows a fixed list of names, each with its
    regexes in `llama-vocab.cpp`, and refuses a name it does not know. Exact matches:

    - ByteLevel(use_regex=True)                      → "gpt-2"     (GPT-2's regex)
    - Digits(individual) + ByteLevel(use_regex=True) → "smollm"    (SmolLM/SmolLM2, StarCoder)
    - Split(Llama-3 regex) + ByteLevel               → "llama-bpe" (IGNORE_MERGES), else "dbrx"
    - Split(Qwen2 regex) + ByteLevel                 → "qwen2"
    - Split(Qwen3.5 regex) + ByteLevel               → "qwen35"

    (each regex as llama.cpp or as Hugging Face's tokenizer.json spells it).

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
        llama3 = "llama-bpe" if ignore_merges else "dbrx"
        exact = {
            LLAMA3_REGEX: llama3,
            HF_LLAMA3_REGEX: llama3,
            QWEN2_REGEX: "qwen2",
            HF_QWEN2_REGEX: "qwen2",
            QWEN35_REGEX: "qwen35",
        }
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
