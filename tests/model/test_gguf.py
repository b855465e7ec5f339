"""GGUF import: a tiny random Llama written the way llama.cpp's convert_hf_to_gguf.py writes it.

The reference for every loaded weight is the original model (F32) or `gguf.quants.dequantize`
of the stored bytes (quantized types); Q/K rows are un-permuted with an index permutation built
independently of `unpermute_rope`.
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

from conftest import TINY_TEXT, tiny_config
from lmforge.errors import LmforgeError
from lmforge.model.formats import gguf_read, load_model
from lmforge.model.transformer import Transformer

N_HEAD, N_KV_HEAD = 4, 2
# Relative Frobenius error of each stored type (measured: F16 2e-4, BF16 2e-3, Q8_0 5e-3,
# Q4_0 0.09, Q4_1 0.08 on N(0, σ) weights); skipping the Q/K unpermute gives ~1.4 on Q.
REL_ERROR = {Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q4_0: 0.15, Q.Q4_1: 0.15}
CHAT_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def make_model(tie: bool) -> Transformer:
    torch.manual_seed(0)
    cfg = tiny_config(
        "llama",
        d_model=64,
        n_head=N_HEAD,
        n_kv_head=N_KV_HEAD,
        d_ff=128,
        tie_embeddings=tie,
        init_std=0.2,  # large enough that RoPE (and so the Q/K row order) moves the logits
    )
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def inverse_rows(rows: int, n_head: int) -> np.ndarray:
    """Row indices that undo `llama_cpp_permute`, derived from the permutation of arange."""
    forward = llama_cpp_permute(np.arange(rows, dtype=np.float64)[:, None], n_head)[:, 0]
    return np.argsort(forward.astype(np.int64))


def gguf_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """Our state dict → GGUF tensor names, fused weights split, Q/K rows permuted (fp32)."""
    cfg = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    qd, kvd = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    out = {
        "token_embd.weight": sd["model.embed_tokens.weight"],
        "output_norm.weight": sd["model.norm.weight"],
    }
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        q, k, v = np.split(sd[p + "self_attn.qkv_proj.weight"], [qd, qd + kvd])
        gate, up = np.split(sd[p + "mlp.gate_up_proj.weight"], 2)
        out[b + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[b + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[b + "attn_q.weight"] = llama_cpp_permute(q, cfg.n_head)
        out[b + "attn_k.weight"] = llama_cpp_permute(k, cfg.n_kv_head)
        out[b + "attn_v.weight"] = v
        out[b + "attn_output.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[b + "ffn_gate.weight"] = gate
        out[b + "ffn_up.weight"] = up
        out[b + "ffn_down.weight"] = sd[p + "mlp.down_proj.weight"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:  # type: ignore[no-untyped-def]
    """Tokenizer metadata as convert_hf_to_gguf.py's `_set_vocab_gpt2` writes it."""
    backend = tokenizer.backend
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = backend.id_to_token(i)
        if tok is None:  # the model's vocabulary is padded past the tokenizer's
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL if tok in special else gguf.TokenType.NORMAL)
    merges = json.loads(backend.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(  # type: ignore[no-untyped-def]
    path: Path, model: Transformer, tokenizer, qtype: Q = Q.F32, arch: str = "llama"
) -> dict[str, tuple[np.ndarray, Q]]:
    """Write MODEL to PATH; returns each tensor's stored data and type."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    add_tokenizer(writer, tokenizer, cfg.vocab_size)
    stored = {}
    for name, arr in gguf_tensors(model).items():
        t = qtype if arr.ndim == 2 else Q.F32  # norms stay F32, as in llama.cpp
        data = gguf.quants.quantize(arr, t)
        writer.add_tensor(name, data, raw_dtype=t)
        stored[name] = (data, t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):  # type: ignore[no-untyped-def]
    return dataclasses.replace(tiny_tokenizer, chat_template=CHAT_TEMPLATE)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("tie", [False, True])
def test_f32_gguf_logits_and_tokenizer_match(tie, chat_tokenizer, tmp_path):  # type: ignore[no-untyped-def]
    model = make_model(tie)
    path = tmp_path / "tiny-f32.gguf"
    stored = write_gguf(path, model, chat_tokenizer)
    assert ("output.weight" in stored) is not tie

    loaded = load_model(path)
    # GGUF stores the epsilon as float32 and has no init_std (a training-only setting).
    assert loaded.config.norm_eps == pytest.approx(model.config.norm_eps, rel=1e-6)
    same = dict(norm_eps=model.config.norm_eps, init_std=model.config.init_std)
    assert dataclasses.replace(loaded.config, **same) == model.config
    got = loaded.model.state_dict()
    for name, want in model.state_dict().items():
        assert torch.equal(got[name], want), name

    g = torch.Generator().manual_seed(1)
    for t in (1, 7, 33):
        ids = torch.randint(0, model.config.vocab_size, (2, t), generator=g)
        with torch.no_grad():
            diff = (loaded.model(ids) - model(ids)).abs().max().item()
        assert diff < 1e-5, (t, diff)

    tok = loaded.tokenizer
    for text in (TINY_TEXT[:200], "naïve 東京 🙂 0123", "<|im_start|>user\nhi<|im_end|>\n"):
        assert tok.encode(text) == chat_tokenizer.encode(text), text
        ids = chat_tokenizer.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.chat_template == CHAT_TEMPLATE
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
        chat_tokenizer.bos_id,
        chat_tokenizer.eos_id,
        chat_tokenizer.pad_id,
    )
    assert loaded.stop_token_ids() == [chat_tokenizer.eos_id]


@pytest.mark.parametrize("qtype", list(REL_ERROR), ids=lambda q: q.name)
@pytest.mark.parametrize("tie", [False, True])
def test_quantized_gguf_weights_equal_dequantized_data(qtype, tie, tiny_tokenizer, tmp_path):  # type: ignore[no-untyped-def]
    model = make_model(tie)
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    stored = write_gguf(path, model, tiny_tokenizer, qtype)
    cfg = model.config

    # Reference: dequantize what was written, undo the Q/K permutation, fuse like our model.
    ref = {}
    for name, (data, t) in stored.items():
        arr = gguf.quants.dequantize(data, t).astype(np.float32)
        if name.endswith("attn_q.weight"):
            arr = arr[inverse_rows(arr.shape[0], cfg.n_head)]
        elif name.endswith("attn_k.weight"):
            arr = arr[inverse_rows(arr.shape[0], cfg.n_kv_head)]
        ref[name] = torch.from_numpy(np.ascontiguousarray(arr))
    expected = {
        "model.embed_tokens.weight": ref["token_embd.weight"],
        "model.norm.weight": ref["output_norm.weight"],
        "lm_head.weight": ref["output.weight" if not tie else "token_embd.weight"],
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
    original = model.state_dict()
    assert set(got) == set(original) == set(expected)
    for name, want in original.items():
        assert torch.equal(got[name], expected[name]), name
        bound = REL_ERROR[qtype] if want.ndim == 2 else 0.0
        assert rel_error(got[name], want) <= bound, (name, rel_error(got[name], want))


def test_skipping_the_rope_unpermute_would_be_caught(tiny_tokenizer, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """Without the un-permutation Q/K weights and logits are far off, beyond every bound above."""
    model = make_model(tie=False)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, model, tiny_tokenizer, Q.F32)
    ids = torch.randint(
        0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)
    )

    monkeypatch.setattr(gguf_read, "unpermute_rope", lambda w, n_head: w)
    wrong = load_model(path).model
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    q_rows = model.config.n_head * model.config.head_dim
    q_wrong, q_right = wrong.state_dict()[qkv][:q_rows], model.state_dict()[qkv][:q_rows]
    assert rel_error(q_wrong, q_right) > 5 * max(REL_ERROR.values())
    with torch.no_grad():
        assert (wrong(ids) - model(ids)).abs().max().item() > 1.0


def test_unpermute_rope_inverts_llama_cpp_permute():  # type: ignore[no-untyped-def]
    w = np.random.default_rng(0).standard_normal((48, 5)).astype(np.float32)
    for n_head in (1, 2, 3, 6):
        permuted = llama_cpp_permute(w, n_head)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(gguf_read.unpermute_rope(permuted, n_head), w)
        np.testing.assert_array_equal(permuted[inverse_rows(48, n_head)], w)


# ---------------------------------------------------------------------------------------------
# Unusable files: one-line errors that name the file


def assert_one_line_error(path: Path) -> LmforgeError:
    with pytest.raises(LmforgeError) as info:
        load_model(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "\n" not in msg
    return info.value


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.98])
def test_truncated_gguf_is_a_one_line_error(keep, tiny_tokenizer, tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "cut.gguf"
    write_gguf(path, make_model(tie=False), tiny_tokenizer, Q.Q8_0)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    assert_one_line_error(path)


def test_garbage_gguf_is_a_one_line_error(tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "garbage.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_one_line_error(path)
    path.write_bytes(b"GGUF" + b"\xff" * 60)  # right magic, nonsense header
    assert_one_line_error(path)
    path.write_bytes(b"")
    assert_one_line_error(path)
    header = (
        b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
    )
    path.write_bytes(header + (2**62).to_bytes(8, "little") + b"key")  # a key longer than the file
    assert_one_line_error(path)
    array = (1).to_bytes(8, "little") + b"k" + (9).to_bytes(4, "little") + (6).to_bytes(4, "little")
    path.write_bytes(header + array + (2**61).to_bytes(8, "little"))  # 2**61 floats promised
    assert_one_line_error(path)


def test_unsupported_gguf_architecture_is_named(tiny_tokenizer, tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, make_model(tie=True), tiny_tokenizer, arch="gpt2")
    exc = assert_one_line_error(path)
    assert "gpt2" in str(exc)
