"""llama.cpp's SentencePiece-style vocabulary (`tokenizer.ggml.model == "llama"`) ↔ `tokenizers`.

llama.cpp does not run SentencePiece. Its SPM tokenizer (`llama-vocab.cpp`, the
`LLAMA_VOCAB_TYPE_SPM` branch of `tokenize` and `llm_tokenizer_spm_session`) does, for Llama 2,
Mistral v0.1, Phi-3, Gemma 1–3 and every other `llama` vocabulary:

1. cut every control, user-defined and unknown token (types 3, 4, 2) out of the raw text first,
   longest first;
2. give each remaining piece a leading space when `add_space_prefix` is on (every piece: each one
   starts the text or follows a special token), then write " " as "▁";
3. start from the piece's characters and keep merging the adjacent pair whose concatenation is a
   token with the highest score (`tokenizer.ggml.scores`), the leftmost pair on a tie;
4. write a character the vocabulary lacks as its UTF-8 bytes, `<0x00>`…`<0xFF>` (byte fallback).

That is a BPE whose merges are every split (left, right) of every token into two tokens, ranked by
the token's score: `tokenizers.models.BPE(byte_fallback=True)` under a normalizer `[Prepend("▁"),
Replace(" ", "▁")]`, no pre-tokenizer, and the special tokens as added tokens (`normalized=False`).
transformers' GGUF converter does much the same but is not the reference: it spells Gemma's
whitespace tokens as "▁▁" and orders Gemma's merges by position instead of score, and its
Metaspace prepends no "▁" to text that starts with a space ("  hi" is "▁▁▁hi" in llama.cpp).

Where the two can still differ, the vocabulary is checked and refused with one LmforgeError line:
no scores (llama.cpp would merge by position alone), missing byte tokens (llama.cpp aborts on an
unknown character), duplicate tokens (llama.cpp aborts), a token that llama.cpp can build from a
character the vocabulary lacks, and special tokens that overlap (llama.cpp cuts the longest first
everywhere, `tokenizers` the leftmost). One difference is left: among pairs of equal score
llama.cpp merges the leftmost first, a BPE the one earlier in its merge list; the list puts the
longer left part first (as transformers' `generate_merges` does). It shows only on runs like
"▁▁▁▁▁" whose middle merges tie, and was not seen on Gemma 3 or SmolLM-style vocabularies (see
tests/tokenizer/test_gguf_spm.py and the llama-tokenize comparison in the issue 22 report).

The way back, `spm_fields`, writes such a tokenizer (or a Hugging Face SentencePiece-style
`tokenizer.json`: BPE with byte fallback and a "▁" normalizer, as Llama 2's and Gemma's) as the
same metadata, with each token's score the negated rank of its first merge, and checks that the
result rebuilds into the same tokenizer.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

from tokenizers import AddedToken, decoders, models, normalizers, processors
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import LmforgeError
from lmforge.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# llama.cpp token types (gguf.TokenType)
TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED = 1, 2, 3, 4
TYPE_UNUSED, TYPE_BYTE = 5, 6
PARTITIONED = (TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED)  # cut out of the text first
SPACE = "\u2581"  # "▁", SentencePiece's space
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
# llama.cpp's defaults for a `llama` vocabulary whose metadata does not say
# (llama_vocab::impl::load, `tokenizer_model == "llama"` and `type == LLAMA_VOCAB_TYPE_SPM`).
DEFAULT_IDS = {"bos": 1, "eos": 2, "unknown": 0}
DEFAULT_ADD_BOS, DEFAULT_ADD_EOS, DEFAULT_ADD_SPACE_PREFIX = True, False, True
# llama.cpp strips the whitespace after Phi-3's special tokens, chosen by `general.name`
# (the `_contains_any(model_name, {"phi-3", "phi3"})` rule of llama_vocab::impl::load).
PHI3_NAMES = ("phi-3", "phi3")
PHI3_NO_RSTRIP = ("<unk>", "<s>", "<|endoftext|>")


def spm_tokenizer(meta: dict[str, Any], source: str) -> Tokenizer:
    """The Tokenizer llama.cpp builds from a `llama` vocabulary in GGUF metadata META.

    Refuses (LmforgeError naming SOURCE and the field) a vocabulary `tokenizers` cannot reproduce.
    """
    tokens = _tokens(meta, source)
    n = len(tokens)
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != n:
        got = "missing" if scores is None else f"{len(scores)} values for {n} tokens"
        raise LmforgeError(
            f"{source}: tokenizer.ggml.scores is {got}; a `llama` (SPM) vocabulary needs one "
            "score per token (llama.cpp merges by score)"
        )
    types = [int(t) for t in meta.get("tokenizer.ggml.token_type") or [TYPE_NORMAL] * n]
    if len(types) != n:
        raise LmforgeError(
            f"{source}: tokenizer.ggml.token_type has {len(types)} values for {n} tokens"
        )
    vocab = {tok: i for i, tok in enumerate(tokens)}
    missing = [b for b in BYTE_TOKENS if b not in vocab]
    if missing:
        raise LmforgeError(
            f"{source}: tokenizer.ggml.tokens lacks {len(missing)} of the 256 byte tokens "
            f"<0x00>…<0xFF> (first {missing[0]}); only SPM vocabularies with byte fallback are "
            "supported"
        )
    scores = [float(s) for s in scores]
    merges = spm_merges(tokens, scores, types, source)
    partitioned = [i for i, t in enumerate(types) if t in PARTITIONED]
    check_special_overlaps([tokens[i] for i in partitioned], source)

    def special_id(key: str) -> int | None:
        tid = meta.get(f"tokenizer.ggml.{key}_token_id", DEFAULT_IDS.get(key))
        return int(tid) if tid is not None and 0 <= int(tid) < n else None

    ids = {key: special_id(key) for key in ("bos", "eos", "unknown", "padding")}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", DEFAULT_ADD_BOS))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", DEFAULT_ADD_EOS))
    add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", DEFAULT_ADD_SPACE_PREFIX))
    unk = ids["unknown"]
    backend = HFTokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=tokens[unk] if unk is not None else None,
            byte_fallback=True,
            fuse_unk=False,
            ignore_merges=False,
        )
    )
    backend.normalizer = spm_normalizer(add_space_prefix)
    backend.pre_tokenizer = None
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    rstrip = _phi3_rstrip(meta, tokens, partitioned, source)
    backend.add_tokens(
        [
            AddedToken(
                tokens[i],
                special=types[i] != TYPE_USER_DEFINED,
                normalized=False,
                rstrip=i in rstrip,
            )
            for i in partitioned
        ]
    )
    backend.post_processor = spm_template(
        tokens, ids["bos"] if add_bos else None, ids["eos"] if add_eos else None
    )
    return wrap_gguf_tokenizer(backend, meta, tokens, ids)


def wrap_gguf_tokenizer(
    backend: HFTokenizer,
    meta: dict[str, Any],
    tokens: Sequence[str],
    ids: dict[str, int | None],
) -> Tokenizer:
    """lmforge's Tokenizer around BACKEND (SentencePiece or BPE): the special tokens of IDS
    (bos, eos, padding, unknown), the chat template and the context length from META."""
    ctx = meta.get(f"{meta.get('general.architecture')}.context_length")

    def text(tid: int | None) -> str | None:
        return None if tid is None else tokens[tid]

    return Tokenizer(
        backend=backend,
        bos_token=text(ids["bos"]),
        eos_token=text(ids["eos"]),
        pad_token=text(ids["padding"]),
        unk_token=text(ids["unknown"]),
        chat_template=meta.get("tokenizer.chat_template"),
        model_max_length=int(ctx) if ctx else None,
    )


def _phi3_rstrip(
    meta: dict[str, Any], tokens: Sequence[str], partitioned: Sequence[int], source: str
) -> set[int]:
    """The special tokens llama.cpp strips the whitespace after: Phi-3's, by `general.name`.

    llama.cpp strips ASCII whitespace (isspace), `tokenizers` any Unicode whitespace, so a
    special token followed by U+00A0, U+3000 or the like is the one place they still differ.
    And llama.cpp strips before it cuts out shorter special tokens, `tokenizers` after, so a
    vocabulary with special tokens that start with whitespace is refused.
    """
    name = str(meta.get("general.name") or "").lower()
    if not any(p in name for p in PHI3_NAMES):
        return set()
    missing = [t for t in (*PHI3_NO_RSTRIP, "</s>") if t not in tokens]
    if missing:
        raise LmforgeError(
            f"{source}: a Phi-3 vocabulary (general.name {name!r}) without {missing[0]!r} "
            "(llama.cpp cannot load it)"
        )
    spaced = [tokens[i] for i in partitioned if tokens[i][:1].isspace()]
    if spaced:
        raise LmforgeError(
            f"{source}: Phi-3 strips whitespace after special tokens, and special token "
            f"{spaced[0]!r} starts with whitespace; llama.cpp and `tokenizers` would cut it "
            "differently"
        )
    return {i for i in partitioned if tokens[i] not in PHI3_NO_RSTRIP}


def spm_normalizer(add_space_prefix: bool) -> normalizers.Normalizer:
    """Spaces as "▁", after a leading one if ADD_SPACE_PREFIX (each text between added tokens)."""
    replace = normalizers.Replace(" ", SPACE)
    if not add_space_prefix:
        return replace
    return normalizers.Sequence([normalizers.Prepend(SPACE), replace])


def spm_merges(
    tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], source: str
) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best score first: llama.cpp's bigram merges.

    Ties (one token split two ways, or tokens of equal score) put the longer left part first.
    Tokens that never occur in the text being merged are left out: those with a " " (every space
    is "▁" by then) and those cut out before (control, user-defined, unknown) unless they hold a
    "▁". A token that llama.cpp can build from a character the vocabulary lacks is refused: the
    BPE sees that character as bytes, not as a symbol.
    """
    vocab = {tok: i for i, tok in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for tid, tok in enumerate(tokens):
        if len(tok) < 2 or " " in tok or (types[tid] in PARTITIONED and SPACE not in tok):
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            in_left, in_right = left in vocab, right in vocab
            if in_left and in_right:
                ranked.append((-scores[tid], -cut, tid, left, right))
            elif (in_left or len(left) == 1) and (in_right or len(right) == 1):
                lacking = left if not in_left else right
                raise LmforgeError(
                    f"{source}: tokenizer.ggml.tokens has {tok!r} but not its character "
                    f"{lacking!r} (U+{ord(lacking):04X}); llama.cpp merges that character, a "
                    "byte-fallback BPE cannot"
                )
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def check_special_overlaps(specials: Sequence[str], source: str) -> None:
    """Refuse special tokens where llama.cpp and `tokenizers` would cut different ones out.

    llama.cpp takes the longest special token first, all through the text; `tokenizers` takes the
    leftmost match, the longest there. They agree unless the end of one token can be the start of
    another ("ab" + "bc" in "abc"). Runs of one character ("\\n\\n", "\\n\\n\\n") overlap
    harmlessly: both cut a run greedily from the left, longest first.
    """
    starts: dict[str, list[str]] = {}
    for tok in specials:
        for cut in range(1, len(tok)):
            starts.setdefault(tok[:cut], []).append(tok)
    for tok in specials:
        for cut in range(1, len(tok)):
            tail = tok[cut:]
            for other in starts.get(tail, ()):
                if _is_run(tok) and _is_run(other) and tok[0] == other[0]:
                    continue
                raise LmforgeError(
                    f"{source}: special tokens {tok!r} and {other!r} overlap; llama.cpp and "
                    "`tokenizers` would split text holding both differently"
                )


def _is_run(tok: str) -> bool:
    return len(set(tok)) == 1


def _tokens(meta: dict[str, Any], source: str) -> list[str]:
    """The token list as llama.cpp reads it: an empty token is "[EMPTY_<id>]"; duplicates abort."""
    tokens = [tok or f"[EMPTY_{i}]" for i, tok in enumerate(meta["tokenizer.ggml.tokens"])]
    if len(set(tokens)) != len(tokens):
        dup = Counter(tokens).most_common(1)[0][0]
        raise LmforgeError(
            f"{source}: tokenizer.ggml.tokens lists {dup!r} twice (llama.cpp refuses such a file)"
        )
    return tokens


def spm_template(
    tokens: Sequence[str], bos: int | None, eos: int | None
) -> processors.PostProcessor | None:
    """BOS/EOS around an encoded text, as `tokenizer.ggml.add_bos_token` / `add_eos_token` say."""
    pre = [] if bos is None else [tokens[bos]]
    post = [] if eos is None else [tokens[eos]]
    if not pre and not post:
        return None
    specials = [(tokens[i], i) for i in {bos, eos} if i is not None]
    return processors.TemplateProcessing(
        single=" ".join([*pre, "$A", *post]),
        pair=" ".join([*pre, "$A", *post, *pre, "$B", *post]),
        special_tokens=specials,
    )


# ---------------------------------------------------------------------------------------------
# Export: a SentencePiece-style Tokenizer → the `llama` vocabulary llama.cpp reads


def is_spm(spec: dict[str, Any]) -> bool:
    """Whether tokenizer.json SPEC is SentencePiece-style: spaces as "▁", a Unigram or a BPE
    with byte fallback (the Unigram ones are refused by `spm_fields`)."""
    model = spec.get("model") or {}
    kind = model.get("type")
    return (kind == "Unigram" or (kind == "BPE" and bool(model.get("byte_fallback")))) and (
        SPACE in json.dumps(spec.get("normalizer"), ensure_ascii=False)
        or SPACE in json.dumps(spec.get("pre_tokenizer"), ensure_ascii=False)
    )


def spm_fields(
    tokenizer: Tokenizer, vocab_size: int, source: str
) -> tuple[list[str], list[float], list[int], bool]:
    """(tokens, scores, token types, add_space_prefix) of an SPM TOKENIZER, padded to VOCAB_SIZE.

    A score is minus the rank of the token's first merge (0 for tokens no merge builds), so the
    merges `spm_merges` derives are the tokenizer's own, in its order; that is checked, and so is
    everything else llama.cpp cannot express (LmforgeError naming SOURCE).
    """
    backend = tokenizer.backend
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") == "Unigram":
        raise LmforgeError(
            f"{source}: a Unigram tokenizer cannot be written as llama.cpp's `llama` vocabulary "
            "(llama.cpp merges pairs by score; it does not run Unigram's best-path search)"
        )
    add_space_prefix = _space_prefix(spec, source)
    if spec.get("pre_tokenizer") and not _harmless_pre_tokenizer(spec["pre_tokenizer"]):
        raise LmforgeError(
            f"{source}: llama.cpp's `llama` vocabulary has no pre-tokenizer; this tokenizer has "
            f"{spec['pre_tokenizer'].get('type')}"
        )
    if (
        model.get("dropout")
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
    ):
        raise LmforgeError(
            f"{source}: BPE dropout or subword affixes have no llama.cpp `llama` equivalent"
        )
    added = {int(i): tok for i, tok in backend.get_added_tokens_decoder().items()}
    for extra in added.values():
        if extra.lstrip or extra.rstrip or extra.single_word:
            raise LmforgeError(
                f"{source}: added token {extra.content!r} strips whitespace or matches whole words "
                "only, which a GGUF cannot say"
            )
        # One matched after the normalizer splits the text after the "▁" is prepended, so the
        # text after it gets none; llama.cpp matches in the raw text and prepends to both sides.
        if extra.normalized and (add_space_prefix or {" ", SPACE} & set(extra.content)):
            raise LmforgeError(
                f"{source}: added token {extra.content!r} is matched in normalized text; "
                "llama.cpp matches special tokens in the raw text"
            )
    if tokenizer.vocab_size > vocab_size:
        raise LmforgeError(
            f"{source}: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
            f"{vocab_size} embedding rows"
        )
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        tok = backend.id_to_token(i)
        if tok is None:  # the model's vocabulary is padded past the tokenizer's
            tokens.append(f"[PAD{i}]")
            types.append(TYPE_UNUSED)
        elif i in added:
            unknown = tok == tokenizer.unk_token
            types.append(
                TYPE_UNKNOWN if unknown else TYPE_CONTROL if added[i].special else TYPE_USER_DEFINED
            )
            tokens.append(tok)
        else:
            tokens.append(tok)
            types.append(TYPE_BYTE if tok in BYTE_TOKEN_SET else TYPE_NORMAL)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    first_rank: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        first_rank.setdefault(left + right, rank)
    scores = [-float(first_rank.get(tok, -1) + 1) for tok in tokens]
    if spm_merges(tokens, scores, types, source) != merges:
        raise LmforgeError(
            f"{source}: the tokenizer's merges are not every split of its tokens ranked by one "
            "score per token, so llama.cpp's `llama` vocabulary cannot reproduce them"
        )
    return tokens, scores, types, add_space_prefix


BYTE_TOKEN_SET = frozenset(BYTE_TOKENS)


def _space_prefix(spec: dict[str, Any], source: str) -> bool:
    """Whether the normalizer prepends "▁" (llama.cpp's add_space_prefix); refuses the rest."""
    norm: dict[str, Any] = spec.get("normalizer") or {}
    steps: list[dict[str, Any]] = (
        norm.get("normalizers") or [] if norm.get("type") == "Sequence" else [norm] if norm else []
    )
    kinds = [step.get("type") for step in steps]
    if kinds == ["Prepend", "Replace"] and steps[0].get("prepend") == SPACE:
        if _replaces_space(steps[1]):
            return True
    elif kinds == ["Replace"] and _replaces_space(steps[0]):
        return False
    pre = spec.get("pre_tokenizer") or {}
    if not kinds and pre.get("type") == "Metaspace":
        if pre.get("prepend_scheme") == "never" and not pre.get("split", True):
            return False
        raise LmforgeError(
            f"{source}: Metaspace prepends '▁' only at the text's start and not before a space; "
            "llama.cpp prepends it to every piece of text (write the tokenizer with a "
            "Prepend('▁') + Replace(' ', '▁') normalizer instead)"
        )
    raise LmforgeError(
        f"{source}: llama.cpp's `llama` vocabulary needs the normalizer Replace(' ', '▁') "
        f"(after Prepend('▁') for a prefix space); this tokenizer has {kinds or 'none'}"
    )


def _replaces_space(step: dict[str, Any]) -> bool:
    return (step.get("pattern") or {}).get("String") == " " and step.get("content") == SPACE


def _harmless_pre_tokenizer(pre: dict[str, Any]) -> bool:
    """Gemma's tokenizer.json splits on " " after the normalizer has replaced every " "."""
    if pre.get("type") == "Metaspace":
        return pre.get("prepend_scheme") == "never" and not pre.get("split", True)
    return pre.get("type") == "Split" and (pre.get("pattern") or {}).get("String") == " "
