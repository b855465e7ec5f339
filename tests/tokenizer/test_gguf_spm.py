"""SentencePiece-style GGUF vocabularies (`tokenizer.ggml.model == "llama"`): rebuilt, written back.

A tiny SPM vocabulary (BPE pieces trained here, scores, the 256 byte tokens, control and
user-defined tokens) goes into GGUF metadata, read from a real .gguf file written with
`gguf.GGUFWriter`. The references:

- `spm_reference.SpmReference`, a slow re-implementation of llama.cpp's SPM tokenizer, checked by
  hand against llama.cpp's `llama-tokenize` on Gemma 3 270M and on Gemma's vocabulary written
  with a prefix space and as Phi-3 (identical ids on a multilingual text, see issue 22);
- transformers' own GGUF tokenizer conversion, on the texts where it behaves as llama.cpp does.
  It differs on a text that starts with a space and on text after a special token: its
  Metaspace prepends "▁" only at the very start and not before a space, llama.cpp prepends it
  to every piece of text (`test_transformers_differs_from_llama_cpp_on_leading_spaces`).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import gguf
import pytest
from spm_reference import SpmReference
from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from tokenizers import Tokenizer as HFTokenizer

from conftest import read_gguf
from lmforge.errors import LmforgeError
from lmforge.tokenizer.gguf import gguf_vocab, tokenizer_from_gguf_fields
from lmforge.tokenizer.tokenizer import Tokenizer

SPACE = "\u2581"
CORPUS = (
    "The quick brown fox jumps over the lazy dog. It's a test, isn't it? "
    "Café naïve résumé façade, Ångström and Straße.\n"
    "def square(x):\n    return x ** 2  # square it\n\n\n"
    "中文测试：你好，世界！我们今天去北京。日本語のテキスト。\n"
    "Numbers 1234567890 and 3.14159; ==== ---- .... ____\n"
) * 8
# English, Chinese, code, emoji, runs of spaces and newlines, accents, special tokens in text.
TEXTS = [
    "Hello world! It's a test.",
    "The quick brown fox jumps over the lazy dog.",
    "中文测试：你好，世界！我们去东京。",
    "def square(x):\n    return x ** 2  # square\n\n\n\nend",
    "emoji 🙂🚀 and 👍🏽, a flag 🇫🇷",
    "Café naïve résumé Ångström Straße ĳ",
    "Multiple     spaces\t\ttabs\n\n\n\nnewlines \r\n crlf",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<br>line<br><br>  two\t\tcolumns",
    "==========  ----------  ..........",
    "  leading spaces and trailing   ",
    " ",
    "\n",
    "x",
    "",
]
# The texts on which transformers' conversion behaves as llama.cpp does: none starts with a
# space or has text after a special token.
SPECIALS = ("<start_of_turn>", "<end_of_turn>", "<br>", "\t\t")
TRANSFORMERS_TEXTS = [
    t for t in TEXTS if t.strip() and t[0] != " " and not any(s in t for s in SPECIALS)
]


@cache
def train_pieces() -> tuple[list[str], list[tuple[str, str]]]:
    """BPE pieces in SentencePiece's spelling ("▁" for a space), trained on CORPUS, and merges."""
    backend = HFTokenizer(models.BPE())
    backend.normalizer = normalizers.Replace(" ", SPACE)
    # Words start at a run of "▁", so runs of spaces become tokens too ("▁▁▁▁" of code).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(f"{SPACE}*[^{SPACE}]*"), "isolated")
    # limit_alphabet leaves some characters (and every emoji) to byte fallback
    trainer = trainers.BpeTrainer(vocab_size=600, limit_alphabet=110, show_progress=False)
    backend.train_from_iterator([CORPUS], trainer)
    spec = json.loads(backend.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    merges = [
        tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]
    ]
    return sorted(vocab, key=vocab.__getitem__), merges  # type: ignore[return-value]


def spm_meta(*, add_space_prefix: bool = True, **overrides: Any) -> dict[str, Any]:
    """GGUF tokenizer metadata laid out as convert_hf_to_gguf.py's `_set_vocab_sentencepiece`
    writes a Llama/Gemma vocabulary: <unk> <s> </s>, the byte tokens, the pieces (score = minus
    the rank of the merge that makes them, so all differ), then control and user-defined ones."""
    pieces, merges = train_pieces()
    rank = {left + right: i for i, (left, right) in reversed(list(enumerate(merges)))}
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for piece in pieces:
        if piece not in tokens:
            tokens.append(piece)
            types.append(1)
            scores.append(-float(rank.get(piece, len(merges) + len(piece))))
    for tok, kind in [("<start_of_turn>", 3), ("<end_of_turn>", 3), ("<br>", 4), ("\t\t", 4)]:
        tokens.append(tok)
        types.append(kind)
        scores.append(0.0)
    meta: dict[str, Any] = {
        "general.architecture": "llama",
        "general.name": "tiny spm",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": add_space_prefix,
    }
    meta.update(overrides)
    return {k: v for k, v in meta.items() if v is not None}


def write_gguf(path: Path, meta: dict[str, Any]) -> Path:
    """META as a vocabulary-only GGUF file (what llama-tokenize reads)."""
    writer = gguf.GGUFWriter(str(path), str(meta["general.architecture"]))
    writer.add_name(str(meta["general.name"]))
    for key, value in meta.items():
        if key in ("general.architecture", "general.name"):
            continue
        if key == "tokenizer.ggml.scores":
            writer.add_array(key, [float(s) for s in value])
        elif key == "tokenizer.ggml.token_type":
            writer.add_token_types(value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_string(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def read_meta(path: Path) -> dict[str, Any]:
    return read_gguf(path)[0]


def reference(meta: dict[str, Any], **kw: Any) -> SpmReference:
    """The llama.cpp reference for META; keywords override its BOS/EOS ids and rstrip_ids."""
    get = meta.get
    options: dict[str, Any] = {
        "add_space_prefix": get("tokenizer.ggml.add_space_prefix", True),
        "bos_id": get("tokenizer.ggml.bos_token_id", 1)
        if get("tokenizer.ggml.add_bos_token", True)
        else None,
        "eos_id": get("tokenizer.ggml.eos_token_id", 2)
        if get("tokenizer.ggml.add_eos_token")
        else None,
    }
    return SpmReference(
        meta["tokenizer.ggml.tokens"],
        meta["tokenizer.ggml.scores"],
        meta["tokenizer.ggml.token_type"],
        **(options | kw),
    )


@pytest.fixture(scope="module")
def meta_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("spm") / "tiny.gguf", spm_meta())


def test_the_vocabulary_exercises_what_it_should(meta_file: Path) -> None:
    meta = read_meta(meta_file)
    tokens = meta["tokenizer.ggml.tokens"]
    assert "🙂" not in tokens and "东" not in tokens  # byte fallback
    assert any(t.startswith(SPACE) and len(t) > 3 for t in tokens)
    assert any(SPACE * 2 in t for t in tokens)  # runs of spaces, where merges tie
    ref = reference(meta)
    ids = ref.encode(TEXTS[4])
    assert set(ids) & set(range(3, 259))  # byte tokens used


@pytest.mark.parametrize("add_space_prefix", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_llama_cpp(text: str, add_space_prefix: bool, tmp_path: Path) -> None:
    meta = read_meta(write_gguf(tmp_path / "t.gguf", spm_meta(add_space_prefix=add_space_prefix)))
    tok = tokenizer_from_gguf_fields(meta, "t.gguf")
    assert tok.encode(text) == reference(meta).encode(text)
    assert tok.encode(text, add_special_tokens=False) == reference(meta, bos_id=None).encode(text)


def test_ids_on_the_joined_text_and_decode(meta_file: Path) -> None:
    meta = read_meta(meta_file)
    tok = tokenizer_from_gguf_fields(meta, "t.gguf")
    text = "\n".join(TEXTS)
    ids = tok.encode(text)
    assert ids == reference(meta).encode(text)
    assert ids[0] == tok.bos_id == 1
    assert tok.decode(ids, skip_special_tokens=False).startswith("<s>")
    plain = "Hello world!\n  中文 🙂 x"
    assert tok.decode(tok.encode(plain)) == plain


def transformers_tokenizer(meta: dict[str, Any]) -> Any:
    """transformers' conversion of the same metadata (`AutoTokenizer(gguf_file=...)`'s path)."""
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    tokenizer_dict = {
        "tokenizer_type": "llama",
        "tokens": meta["tokenizer.ggml.tokens"],
        "scores": meta["tokenizer.ggml.scores"],
        "token_type": meta["tokenizer.ggml.token_type"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "unk_token_id": 0,
        "add_prefix_space": True,
    }
    backend, _ = mapping.convert_gguf_tokenizer("llama", tokenizer_dict)
    return backend


@pytest.mark.parametrize("text", TRANSFORMERS_TEXTS)
def test_ids_equal_transformers_where_it_follows_llama_cpp(text: str, meta_file: Path) -> None:
    meta = read_meta(meta_file)
    theirs = transformers_tokenizer(meta).encode(text, add_special_tokens=False).ids
    assert reference(meta, bos_id=None).encode(text) == theirs  # the two references agree
    tok = tokenizer_from_gguf_fields(meta, "t.gguf")
    assert tok.encode(text, add_special_tokens=False) == theirs


def test_transformers_differs_from_llama_cpp_on_leading_spaces(meta_file: Path) -> None:
    """llama.cpp writes " hi" as "▁▁hi" and "<start_of_turn>user" with a "▁" before "user";
    transformers' Metaspace gives "▁hi" and "user". We follow llama.cpp."""
    meta = read_meta(meta_file)
    theirs = transformers_tokenizer(meta)
    tok = tokenizer_from_gguf_fields(meta, "t.gguf")
    ref = reference(meta, bos_id=None)
    for text in (" hi", "<start_of_turn>user"):
        ours = tok.encode(text, add_special_tokens=False)
        assert ours == ref.encode(text)
        assert ours != theirs.encode(text, add_special_tokens=False).ids
    pieces = [tok.id_to_token(i) for i in tok.encode(" hi", add_special_tokens=False)]
    assert "".join(p or "" for p in pieces) == SPACE * 2 + "hi"


def test_special_tokens_flags_and_llama_cpp_defaults(tmp_path: Path) -> None:
    meta = spm_meta(
        **{
            "tokenizer.ggml.add_bos_token": None,  # llama.cpp: BOS on, EOS off, ids 1 / 2 / 0
            "tokenizer.ggml.add_eos_token": None,
            "tokenizer.ggml.bos_token_id": None,
            "tokenizer.ggml.eos_token_id": None,
            "tokenizer.ggml.unknown_token_id": None,
            "tokenizer.ggml.add_space_prefix": None,  # llama.cpp: on
            "tokenizer.chat_template": "{{ messages }}",
            "llama.context_length": 4096,
        }
    )
    tok = tokenizer_from_gguf_fields(read_meta(write_gguf(tmp_path / "d.gguf", meta)), "d")
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == (
        "<s>",
        "</s>",
        "<unk>",
        None,
    )
    ids = tok.encode("hi")
    assert ids[0] == 1 and ids[-1] != 2
    assert (tok.id_to_token(ids[1]) or "").startswith(SPACE)
    assert tok.chat_template == "{{ messages }}" and tok.model_max_length == 4096
    tok = tokenizer_from_gguf_fields(
        spm_meta(**{"tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": True}),
        "e",
    )
    assert tok.encode("hi")[-1] == 2 and tok.encode("hi")[0] != 1
    # Control tokens are special (skipped when decoding), user-defined ones are text.
    ids = tok.encode("<start_of_turn>a<br>b", add_special_tokens=False)
    assert ids[0] == tok.token_to_id("<start_of_turn>") and tok.token_to_id("<br>") in ids
    assert tok.decode(ids) == "a<br> b"


def test_phi3_strips_whitespace_after_its_special_tokens() -> None:
    """llama.cpp strips the whitespace after Phi-3's special tokens (but <s>, <unk> and
    <|endoftext|>), chosen by the model's name."""
    meta = spm_meta(**{"general.name": "Phi-3 mini"})
    tokens = meta["tokenizer.ggml.tokens"]
    meta["tokenizer.ggml.tokens"] = [*tokens[:-4], "<|endoftext|>", "<|user|>", "<|end|>", "<br>"]
    meta["tokenizer.ggml.token_type"] = [*meta["tokenizer.ggml.token_type"][:-4], 3, 3, 3, 4]
    tok = tokenizer_from_gguf_fields(meta, "phi3")
    tokens = meta["tokenizer.ggml.tokens"]
    rstrip = frozenset(
        i for i, t in enumerate(tokens) if t in ("</s>", "<|user|>", "<|end|>", "<br>")
    )
    ref = reference(meta, rstrip_ids=rstrip)
    text = "<|user|>\n  What is it?<|end|>\n<|endoftext|>  x</s> \t y<s> z<br>\n w"
    assert tok.encode(text) == ref.encode(text)
    assert tok.encode(text) != reference(meta).encode(text)  # the stripping shows
    assert tok.encode("<|user|>\u00a0x") != ref.encode("<|user|>\u00a0x")  # the one difference left


def one_line(info: pytest.ExceptionInfo[LmforgeError], *needles: str) -> None:
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        ({"tokenizer.ggml.model": "t5"}, ("tokenizer.ggml.model", "'t5'", "gpt2, llama")),
        ({"tokenizer.ggml.scores": None}, ("tokenizer.ggml.scores", "missing")),
        ({"tokens": lambda t: [*t[:100], "[gone]", *t[101:]]}, ("<0x61>", "byte tokens")),
        ({"tokens": lambda t: [*t[:-1], t[-2]]}, ("tokenizer.ggml.tokens", "twice")),
        (
            {"tokens": lambda t: [*t[:-2], "<ab>", "b>c"], "general.name": "x"},
            ("'<ab>'", "'b>c'", "overlap"),
        ),
        ({"general.name": "Phi-3"}, ("'\\t\\t'", "whitespace")),
        (
            {"tokens": lambda t: [*t[:-1], "x\u0100"], "types": 1},
            ("'x\u0100'", "U+0100"),
        ),
    ],
)
def test_what_cannot_be_rebuilt_exactly_is_refused(
    change: dict[str, Any], needles: tuple[str, ...]
) -> None:
    meta = spm_meta()
    tokens = meta["tokenizer.ggml.tokens"]
    if "general.name" in change and change["general.name"] == "Phi-3":
        tokens = [*tokens[:-4], "<|endoftext|>", "<|user|>", "<|end|>", "\t\t"]
    for key, value in change.items():
        if key == "tokens":
            tokens = value(tokens)
        elif key == "types":
            meta["tokenizer.ggml.token_type"] = [*meta["tokenizer.ggml.token_type"][:-1], value]
        elif value is None:
            meta.pop(key)
        else:
            meta[key] = value
    meta["tokenizer.ggml.tokens"] = tokens
    with pytest.raises(LmforgeError) as info:
        tokenizer_from_gguf_fields(meta, "m.gguf")
    one_line(info, "m.gguf", *needles)


# ---------------------------------------------------------------------------------------------
# The way back: gguf_vocab → a GGUF llama.cpp reads → the same tokenizer


def export_and_read(tok: Tokenizer, vocab_size: int, tmp_path: Path) -> dict[str, Any]:
    vocab = gguf_vocab(tok, vocab_size, "src")
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    writer.add_name("x")
    vocab.write_to(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return read_meta(tmp_path / "x.gguf")


@pytest.mark.parametrize("add_space_prefix", [True, False])
def test_export_round_trips(add_space_prefix: bool, tmp_path: Path) -> None:
    meta = spm_meta(add_space_prefix=add_space_prefix)
    tok = tokenizer_from_gguf_fields(meta, "t")
    tok.save(tmp_path)  # as a model directory keeps it: tokenizer.json
    tok = Tokenizer.load(tmp_path)
    n = len(meta["tokenizer.ggml.tokens"])
    back_meta = export_and_read(tok, n + 3, tmp_path)
    assert back_meta["tokenizer.ggml.model"] == "llama"
    assert back_meta["tokenizer.ggml.add_space_prefix"] is add_space_prefix
    assert back_meta["tokenizer.ggml.tokens"][:n] == meta["tokenizer.ggml.tokens"]
    assert back_meta["tokenizer.ggml.tokens"][n:] == [f"[PAD{i}]" for i in range(n, n + 3)]
    types = back_meta["tokenizer.ggml.token_type"]
    assert types[:n] == meta["tokenizer.ggml.token_type"] and types[n:] == [5, 5, 5]
    assert "tokenizer.ggml.merges" not in back_meta
    back = tokenizer_from_gguf_fields(back_meta, "x.gguf")
    for text in [*TEXTS, "\n".join(TEXTS)]:
        assert back.encode(text) == tok.encode(text), text


def test_export_of_a_transformers_spm_tokenizer(meta_file: Path, tmp_path: Path) -> None:
    """A Hugging Face SentencePiece tokenizer.json with a Prepend + Replace normalizer (as
    Llama 2's and Phi-3's are written) exports exactly; one with Metaspace is refused."""
    meta = read_meta(meta_file)
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    tokenizer_dict = {
        "tokenizer_type": "llama",
        "tokens": meta["tokenizer.ggml.tokens"],
        "scores": meta["tokenizer.ggml.scores"],
        "token_type": meta["tokenizer.ggml.token_type"],
    }
    backend, _ = mapping.convert_gguf_tokenizer("phi3", tokenizer_dict)
    hf = Tokenizer(backend=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    back = tokenizer_from_gguf_fields(
        export_and_read(hf, len(meta["tokenizer.ggml.tokens"]), tmp_path), "x"
    )
    for text in TEXTS:
        assert back.encode(text) == hf.encode(text), text

    llama, _ = mapping.convert_gguf_tokenizer("llama", tokenizer_dict)
    with pytest.raises(LmforgeError) as info:
        gguf_vocab(Tokenizer(backend=llama), 1000, "m")
    one_line(info, "Metaspace", "every piece")


def test_export_refuses_what_llama_cpp_cannot_say() -> None:
    unigram = HFTokenizer(
        models.Unigram([("<unk>", 0.0), (SPACE + "a", -1.0), ("a", -2.0)], 0, byte_fallback=True)
    )
    unigram.normalizer = normalizers.Replace(" ", SPACE)
    unigram.decoder = decoders.ByteFallback()
    with pytest.raises(LmforgeError) as info:
        gguf_vocab(Tokenizer(backend=unigram), 10, "u")
    one_line(info, "Unigram")

    tok = tokenizer_from_gguf_fields(spm_meta(), "t")
    tok.backend.add_tokens([AddedToken("<x>", rstrip=True)])
    with pytest.raises(LmforgeError) as info:
        gguf_vocab(tok, 1000, "r")
    one_line(info, "'<x>'", "strips whitespace")

    tok = tokenizer_from_gguf_fields(spm_meta(), "t")
    tok.backend.add_tokens([AddedToken("<y>", normalized=True)])
    with pytest.raises(LmforgeError) as info:
        gguf_vocab(tok, 1000, "n")
    one_line(info, "'<y>'", "normalized text")

    tok = tokenizer_from_gguf_fields(spm_meta(), "t")
    spec = json.loads(tok.backend.to_str())
    del spec["model"]["merges"][10]  # a token llama.cpp would build and this BPE never does
    tok = Tokenizer(backend=HFTokenizer.from_str(json.dumps(spec)))
    with pytest.raises(LmforgeError) as info:
        gguf_vocab(tok, 1000, "o")
    one_line(info, "merges", "one score per token")
