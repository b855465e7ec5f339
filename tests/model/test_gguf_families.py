"""GGUF import and export for every family with a llama.cpp layout (llama, mistral as llama,
qwen2, qwen3, gemma2, gemma3, olmo2, smollm3, phi3): a tiny random model per family, with its
distinctive features switched on, written by our exporter and read back.

References: the original model (F32: same config, same weights, logits within 1e-5), each stored
type's error bound (Q8_0 from our exporter; Q4_0 written by re-quantizing the F32 file
with `gguf.quants.quantize`; K-quants from random block bytes, loaded as exactly what
`gguf.quants.dequantize` makes of them), and llama.cpp's own tables in the `gguf` package
(`MODEL_TENSORS`, `get_tensor_name_map`) for names. The facts the layouts encode — Q/K rows
permuted for llama only, Gemma's norms stored as 1 + w, Phi-3's fused tensors, OLMo 2's
post-norms, the metadata keys — are checked on the stored data. (llama.cpp itself runs these
files in a dev check, bench/gguf_llama_cpp.py, not here.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_gguf import llama_cpp_permute

from conftest import read_gguf
from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.formats import LoadedModel, load_model
from lmforge.model.formats.families import FAMILIES, family_for_gguf_arch
from lmforge.model.formats.gguf_layout import llama3_rope_factors, llama3_scaling_from_factors
from lmforge.model.formats.gguf_write import GGUFType, export_gguf
from lmforge.model.transformer import Transformer

COMMON: dict[str, Any] = {
    "vocab_size": 384,
    "d_model": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_kv_head": 2,
    "d_ff": 96,
    "max_seq_len": 128,
    "init_std": 0.2,  # large enough that RoPE, windows and caps move the logits
}
LLAMA3 = {
    "type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 8.0,
    "original_max_position_embeddings": 8192,
}
# case → (ModelConfig fields, {GGUF key or tensor: expected value}); None: must be absent.
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "llama": (
        {"arch": "llama", "tie_embeddings": False, "qkv_bias": True, "o_bias": True,
         "rope_scaling": LLAMA3},
        {"llama.vocab_size": 384, "llama.rope.dimension_count": 16, "rope_freqs.weight": True,
         "llama.rope.scaling.original_context_length": 8192, "blk.0.attn_output.bias": True},
    ),
    "mistral": (  # without a sliding window: llama.cpp's llama, as its converter writes it
        {"arch": "mistral", "tie_embeddings": False, "rope_theta": 1e6},
        {"general.architecture": "llama", "llama.rope.freq_base": 1e6, "output.weight": True},
    ),
    "qwen2": (
        {"arch": "qwen2", "tie_embeddings": False,
         "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 40}},
        {"qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0,
         "qwen2.rope.scaling.original_context_length": 40, "blk.0.attn_q.bias": True,
         "blk.0.attn_output.bias": None},
    ),
    "qwen3": (
        {"arch": "qwen3", "head_dim": 24, "rope_scaling": {"type": "linear", "factor": 2.0}},
        {"qwen3.attention.key_length": 24, "qwen3.rope.scaling.type": "linear",
         "blk.0.attn_q_norm.weight": True, "output.weight": None},
    ),
    "gemma2": (
        {"arch": "gemma2", "n_layer": 3, "head_dim": 16, "sliding_window": 8,
         "attn_softcap": 5.0, "final_softcap": 3.0},
        {"gemma2.attn_logit_softcapping": 5.0, "gemma2.final_logit_softcapping": 3.0,
         "gemma2.attention.sliding_window": 8, "gemma2.attention.sliding_window_pattern": None,
         "gemma2.attention.key_length": 16, "blk.0.post_ffw_norm.weight": True,
         "output.weight": None},
    ),
    "gemma3": (
        {"arch": "gemma3", "n_layer": 6, "head_dim": 16, "sliding_window": 8,
         "tie_embeddings": False, "rope_scaling": {"type": "linear", "factor": 4.0}},
        {"gemma3.attention.sliding_window": 8, "gemma3.rope.freq_base": 1e6,
         "gemma3.rope.freq_base_swa": 1e4, "gemma3.attention.sliding_window_pattern": None,
         "gemma3.attn_logit_softcapping": None, "blk.0.attn_k_norm.weight": True},
    ),
    "gemma3_pattern": (
        {"arch": "gemma3", "head_dim": 16, "sliding_window": 8,
         "layer_types": ("full", "sliding"), "rope_theta_local": 2e4},
        {"gemma3.attention.sliding_window_pattern": [False, True],
         "gemma3.rope.freq_base_swa": 2e4},
    ),
    "olmo2": (  # post-norms only, QK-norm over all heads, its own LM head
        {"arch": "olmo2", "tie_embeddings": False},
        {"blk.0.post_attention_norm.weight": True, "blk.0.post_ffw_norm.weight": True,
         "blk.0.attn_norm.weight": None, "blk.0.ffn_norm.weight": None,
         "blk.0.attn_q_norm.weight": True, "output.weight": True},
    ),
    "smollm3": (  # NoPE on every 4th layer: llama.cpp's own pattern, no key says it
        {"arch": "smollm3", "n_layer": 4, "tie_embeddings": True},
        {"general.architecture": "smollm3", "smollm3.rope.dimension_count": 16,
         "output.weight": None},
    ),
    "phi3": (
        {"arch": "phi3", "rotary_fraction": 0.5, "sliding_window": 8, "tie_embeddings": False},
        {"phi3.rope.dimension_count": 8, "phi3.attention.sliding_window": 8,
         "blk.0.attn_qkv.weight": True, "blk.0.attn_q.weight": None, "blk.0.ffn_gate.weight": None},
    ),
}  # fmt: skip
FAMILY_CASES = [c for c in CASES if c != "gemma3_pattern"]
ARCH = {c: CASES[c][0]["arch"] for c in CASES}


def make_model(case: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**COMMON, **CASES[case][0]}))
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def export(model: Transformer, tokenizer: Any, path: Path, dtype: GGUFType = "f32") -> Path:
    loaded = LoadedModel(model, tokenizer, path.with_suffix(""), lineage={"name": "tiny"})
    return export_gguf(loaded, path, dtype)


def read(path: Path) -> tuple[dict[str, Any], dict[str, gguf.ReaderTensor]]:
    return read_gguf(path)


def stored(t: gguf.ReaderTensor) -> np.ndarray:
    shape = tuple(int(x) for x in reversed(t.shape))
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)


def ids(t: int = 40) -> torch.Tensor:
    return torch.randint(
        0, COMMON["vocab_size"], (2, t), generator=torch.Generator().manual_seed(1)
    )


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Any:
    """case → (model, its F32 GGUF), made once per module."""
    cache: dict[str, tuple[Transformer, Path]] = {}

    def get(case: str) -> tuple[Transformer, Path]:
        if case not in cache:
            model = make_model(case)
            path = export(model, tiny_tokenizer, tmp_path_factory.mktemp(case) / "f32.gguf")
            cache[case] = (model, path)
        return cache[case]

    return get


# ---------------------------------------------------------------------------------------------
# F32: the same model back


@pytest.mark.parametrize("case", list(CASES))
def test_f32_round_trip_is_the_same_model(case: str, written: Any) -> None:
    model, path = written(case)
    loaded = load_model(path)
    same = dict(norm_eps=model.config.norm_eps, init_std=model.config.init_std)
    read_as = FAMILIES[model.config.arch].gguf
    assert read_as is not None
    want = dataclasses.replace(model.config, arch=family_for_gguf_arch(read_as.arch, "x").name)
    assert dataclasses.replace(loaded.config, **same) == want  # Mistral reads back as llama
    got = loaded.model.state_dict()
    assert set(got) == set(model.state_dict())
    offset = 1.0 if model.config.norm == "rms_offset" else 0.0
    for name, want in model.state_dict().items():
        if offset and name.endswith("norm.weight"):  # Gemma's x̂·(1 + w): 1 + w is exact
            got[name], want = got[name] + offset, want + offset
        assert torch.equal(got[name], want), name
    with torch.no_grad():
        diff = (loaded.model(ids()) - model(ids())).abs().max().item()
    assert diff < 1e-5, diff


# ---------------------------------------------------------------------------------------------
# Quantized: every weight within its type's error, logits near


def requantize(src: Path, dst: Path, qtype: Q) -> None:
    """SRC's metadata and tensors into DST, matrices quantized to QTYPE (a mini llama-quantize:
    1-D tensors stay F32, matrices whose rows are not whole blocks stay as they are)."""
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), str(reader.fields["general.architecture"].contents()))
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = fld.types[-1] if fld.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, fld.contents(), fld.types[0], sub)
    for t in reader.tensors:
        arr = stored(t)
        kind = (
            qtype
            if arr.ndim == 2 and arr.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0
            else Q.F32
        )
        writer.add_tensor(t.name, gguf.quants.quantize(arr, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# Relative Frobenius error of each weight per stored type (measured on these models: Q8_0 0.0055,
# Q4_0 0.089) and of the logits, which these random, deep-enough-to-matter models amplify about
# sixfold (measured: Q8_0 ≤ 0.042, Q4_0 ≤ 0.58; a wrong row order or norm gives > 1).
WEIGHT_ERROR = {Q.Q8_0: 0.01, Q.Q4_0: 0.12}
LOGIT_ERROR = {Q.Q8_0: 0.06, Q.Q4_0: 0.8}


@pytest.mark.parametrize("qtype", list(WEIGHT_ERROR), ids=lambda q: q.name)
@pytest.mark.parametrize("case", FAMILY_CASES)
def test_quantized_round_trip_within_the_type_error(
    case: str, qtype: Q, written: Any, tiny_tokenizer: Any, tmp_path: Path
) -> None:
    model, f32 = written(case)
    path = tmp_path / "q.gguf"
    if qtype == Q.Q8_0:
        export(model, tiny_tokenizer, path, "q8_0")
    else:
        requantize(f32, path, qtype)
    _, tensors = read(path)
    assert {t.tensor_type for t in tensors.values() if len(t.shape) == 2} <= {qtype, Q.F16}
    loaded = load_model(path).model
    got = loaded.state_dict()
    offset = 1.0 if model.config.norm == "rms_offset" else 0.0
    for name, want in model.state_dict().items():
        if want.ndim == 1:  # norms and biases: F32, as exact as in test_f32_round_trip_…
            shift = offset if name.endswith("norm.weight") else 0.0
            assert torch.equal(got[name] + shift, want + shift), name
        else:
            assert rel_error(got[name], want) <= WEIGHT_ERROR[qtype], name
    with torch.no_grad():
        error = rel_error(loaded(ids()), model(ids()))
    assert error <= LOGIT_ERROR[qtype], error


def random_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Block bytes of QTYPE whose every f16 scale is finite: all bytes below 0x3C (the high byte
    of an f16 below 1)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return rng.integers(0, 0x3C, (rows, cols // block * size), dtype=np.uint8)


K_QUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS)


def test_k_quants_load_as_their_dequantized_blocks(tiny_tokenizer: Any, tmp_path: Path) -> None:
    """Rows of 256 (K-quant blocks) stored as random K-quant and IQ blocks: every weight is
    what `gguf.quants.dequantize` makes of its blocks (llama.cpp's own dequantization gives the
    same bytes: checked in the dev check), fused and renamed by the qwen3 table."""
    torch.manual_seed(0)
    config = ModelConfig(arch="qwen3", **{**COMMON, "d_model": 256, "d_ff": 256, "n_layer": 1})
    f32 = export(Transformer(config).eval(), tiny_tokenizer, tmp_path / "f32.gguf")
    reader = gguf.GGUFReader(str(f32))
    writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "qwen3")
    for key, fld in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            sub = fld.types[-1] if fld.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, fld.contents(), fld.types[0], sub)
    rng = np.random.default_rng(0)
    blocks: dict[str, tuple[np.ndarray, Q]] = {}
    for t in reader.tensors:
        arr = stored(t)
        if arr.ndim == 2:
            qtype = K_QUANTS[len(blocks) % len(K_QUANTS)]
            data = random_blocks(qtype, arr.shape[0], arr.shape[1], rng)
            blocks[t.name] = (data, qtype)
            writer.add_tensor(t.name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert {q for _, q in blocks.values()} == set(K_QUANTS)

    def deq(name: str) -> torch.Tensor:
        data, qtype = blocks[name]
        return torch.from_numpy(gguf.quants.dequantize(data, qtype).astype(np.float32))

    model = load_model(tmp_path / "k.gguf").model
    sd = model.state_dict()
    assert torch.equal(sd["model.embed_tokens.weight"], deq("token_embd.weight"))
    qkv = torch.cat([deq(f"blk.0.attn_{x}.weight") for x in "qkv"])
    assert torch.equal(sd["model.layers.0.self_attn.qkv_proj.weight"], qkv)
    gate_up = torch.cat([deq("blk.0.ffn_gate.weight"), deq("blk.0.ffn_up.weight")])
    assert torch.equal(sd["model.layers.0.mlp.gate_up_proj.weight"], gate_up)
    assert torch.equal(sd["model.layers.0.mlp.down_proj.weight"], deq("blk.0.ffn_down.weight"))
    with torch.no_grad():
        assert torch.isfinite(model(ids(8))).all()


# ---------------------------------------------------------------------------------------------
# Layout: llama.cpp's names, row orders, stored norms and metadata keys


@pytest.mark.parametrize("case", list(CASES))
def test_layout_is_llama_cpp_s(case: str, written: Any) -> None:
    model, path = written(case)
    cfg = model.config
    layout = FAMILIES[cfg.arch].gguf
    assert layout is not None
    meta, tensors = read(path)
    assert meta["general.architecture"] == layout.arch
    # Every tensor is one llama.cpp's architecture has (gguf-py's constants.py) …
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == layout.arch)
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    for name in tensors:
        base = name.rsplit(".", 1)[0]
        assert base in known or base.replace(name.split(".")[1], "{bid}", 1) in known, name
    # … and each GGUF name is where the converter puts the family's HF tensor (tensor_mapping.py).
    names = gguf.get_tensor_name_map(arch, cfg.n_layer)
    ours = {v: k for k, v in layout.tensors.items()}
    for hf, module in FAMILIES[cfg.arch].layer_names.items():
        gguf_name = names.get_name(f"model.layers.0.{hf}.weight", try_suffixes=(".weight",))
        assert gguf_name == f"blk.0.{ours[module]}.weight", (hf, gguf_name)

    for key, want in CASES[case][1].items():
        got = tensors.get(key) if key.endswith((".weight", ".bias")) else meta.get(key)
        if want is None or want is True:
            assert (got is not None) is bool(want), key
        elif isinstance(want, float):
            assert got == pytest.approx(want), key
        else:
            assert got == want, key

    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    p = "model.layers.0."
    qd = cfg.n_head * cfg.head_dim
    q = sd[p + "self_attn.qkv_proj.weight"][:qd]
    if "blk.0.attn_qkv.weight" in tensors:  # Phi-3: fused as ours, gate+up in ffn_up
        np.testing.assert_array_equal(stored(tensors["blk.0.attn_qkv.weight"])[:qd], q)
        up = stored(tensors["blk.0.ffn_up.weight"])
        np.testing.assert_array_equal(up, sd[p + "mlp.gate_up_proj.weight"])
    else:  # interleaved-RoPE row order for llama only
        want_q = llama_cpp_permute(q, cfg.n_head) if layout.interleaved_rope else q
        np.testing.assert_array_equal(stored(tensors["blk.0.attn_q.weight"]), want_q)
    shift = 1.0 if cfg.norm == "rms_offset" else 0.0  # Gemma: the converter stores 1 + w
    norms = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "post_attention_norm": "attn_output_norm",
        "post_ffw_norm": "mlp_output_norm",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
    }
    for gguf_name, module in norms.items():
        if f"{p}{module}.weight" not in sd:
            assert f"blk.0.{gguf_name}.weight" not in tensors, gguf_name
            continue
        want = sd[f"{p}{module}.weight"] + np.float32(shift)
        np.testing.assert_array_equal(stored(tensors[f"blk.0.{gguf_name}.weight"]), want)
    np.testing.assert_array_equal(
        stored(tensors["output_norm.weight"]), sd["model.norm.weight"] + np.float32(shift)
    )


def test_llama3_rope_factors_read_back_as_their_parameters() -> None:
    """rope_freqs.weight → the Llama 3 parameters; with too few frequencies between the bands
    to fit them, parameters that give the same factors."""
    factors = llama3_rope_factors(LLAMA3, 16, 10000.0)
    assert llama3_scaling_from_factors(factors, 16, 10000.0, 8192, "f") == LLAMA3
    real = {**LLAMA3, "high_freq_factor": 4.0}  # Llama 3.1 8B's, on 128-dim heads
    assert (
        llama3_scaling_from_factors(
            llama3_rope_factors(real, 128, 500000.0), 128, 500000.0, 8192, "f"
        )
        == real
    )
    sparse = {**LLAMA3, "original_max_position_embeddings": 32, "high_freq_factor": 4.0}
    factors = llama3_rope_factors(sparse, 16, 500000.0)
    again = llama3_scaling_from_factors(factors, 16, 500000.0, 8192, "f")
    assert again is not None
    np.testing.assert_array_equal(llama3_rope_factors(again, 16, 500000.0), factors)
    with pytest.raises(LmforgeError, match="does not follow Llama 3"):
        llama3_scaling_from_factors(np.linspace(1, 3, 8), 16, 10000.0, 8192, "f")


# ---------------------------------------------------------------------------------------------
# What cannot be written or read: one-line errors


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"arch": "gemma2", "sliding_window": 8, "tie_embeddings": False}, "ties the LM head"),
        ({"arch": "gemma2", "sliding_window": 8, "query_pre_attn_scalar": 24.0}, "24"),
        ({"arch": "gemma2"}, "a model without sliding-window layers"),
        ({"arch": "gemma2", "sliding_window": 8, "attn_softcap": 0.0}, "attn_softcap = 0"),
        ({"arch": "gemma3", "attn_softcap": 5.0}, "cannot run attn_softcap = 5"),
        (
            {
                "arch": "gemma2",
                "sliding_window": 8,
                "rope_theta_local": 2e4,
                "rope_scaling": {"type": "linear", "factor": 2.0},
            },
            "scales RoPE on sliding layers too",
        ),
        ({"arch": "qwen2", "head_dim": 24}, "n_head·head_dim = d_model"),
        ({"arch": "qwen2", "sliding_window": 8, "layer_types": ("full", "sliding")}, "sliding"),
        ({"arch": "qwen3", "qkv_bias": True, "o_bias": True}, "no o_bias"),
        ({"arch": "qwen3", "rope_scaling": LLAMA3}, "no Llama 3 RoPE scaling"),
        ({"arch": "llama", "rotary_fraction": 0.5}, "rotates whole heads"),
        (
            {"arch": "qwen2", "rope_scaling": {"type": "yarn", "factor": 2.0, "beta_fast": 8.0}},
            "beta_fast = 8",
        ),
        ({"arch": "llama", "qk_norm": "head"}, "qk_norm"),
        ({"arch": "olmo2"}, "olmo2 needs its own output.weight"),
        ({"arch": "smollm3", "layer_types": ("nope", "full")}, "runs layer_types ['full', 'full']"),
        ({"arch": "smollm3", "qkv_bias": True, "o_bias": True}, "no qkv_bias"),
        ({"arch": "olmo2", "tie_embeddings": False, "head_dim": 24}, "n_head·head_dim = d_model"),
        ({"arch": "mistral", "sliding_window": 8}, "llama cannot run sliding-window layers"),
        ({"arch": "gpt2"}, "not 'gpt2'"),
    ],
)
def test_unwritable_features_are_one_line_errors(
    fields: dict[str, Any], message: str, tiny_tokenizer: Any, tmp_path: Path
) -> None:
    model = Transformer(ModelConfig(**{**COMMON, "tie_embeddings": True, **fields}))
    with pytest.raises(LmforgeError) as info:
        export(model, tiny_tokenizer, tmp_path / "x.gguf")
    assert "\n" not in str(info.value)
    assert message in str(info.value)
    assert not list(tmp_path.glob("*.gguf*"))


def rewrite(src: Path, dst: Path, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> Path:
    """SRC with metadata keys and F32 tensors added or replaced (None: removed)."""
    reader = gguf.GGUFReader(str(src))
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(str(dst), str(meta.get("general.architecture", arch)))
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in meta:
            continue
        sub = fld.types[-1] if fld.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, fld.contents(), fld.types[0], sub)
    for key, value in meta.items():
        if key == "general.architecture" or value is None:
            continue
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    for t in reader.tensors:
        if t.name not in tensors:
            writer.add_tensor(t.name, stored(t))
    for name, arr in tensors.items():
        if arr is not None:
            writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.mark.parametrize(
    ("case", "meta", "tensors", "message"),
    [
        ("qwen2", {"general.architecture": "falcon"}, {}, "architecture 'falcon'"),
        ("qwen2", {"qwen2.expert_count": 8}, {}, "mixture-of-experts"),
        ("qwen3", {"qwen3.attention.head_count_kv": [2, 1]}, {}, "per-layer"),
        ("llama", {"llama.rope.dimension_count": 8}, {}, "partial rotary"),
        ("qwen2", {"qwen2.attention.layer_norm_epsilon": 1e-5}, {}, "LayerNorm"),
        ("qwen2", {}, {"rope_freqs.weight": np.ones(8, np.float32)}, "rope_freqs"),
        ("llama", {}, {"rope_freqs.weight": np.linspace(1, 3, 8, dtype=np.float32)}, "Llama 3"),
        ("phi3", {}, {"rope_factors_long.weight": np.ones(4, np.float32)}, "LongRoPE"),
        ("qwen3", {}, {"blk.0.post_ffw_norm.weight": np.ones(64, np.float32)}, "unexpected"),
        ("olmo2", {"olmo2.attention.sliding_window": 16}, {}, "OLMo 3's sliding-window layers"),
    ],
)
def test_unreadable_files_are_one_line_errors(
    case: str,
    meta: dict[str, Any],
    tensors: dict[str, np.ndarray],
    message: str,
    written: Any,
    tmp_path: Path,
) -> None:
    _, src = written(case)
    path = rewrite(src, tmp_path / "odd.gguf", meta, tensors)
    with pytest.raises(LmforgeError) as info:
        load_model(path)
    assert "\n" not in str(info.value)
    assert message in str(info.value), str(info.value)
    assert str(path) in str(info.value)


def test_llama_cpp_defaults_apply_to_keys_a_file_leaves_out(written: Any, tmp_path: Path) -> None:
    """A Gemma 2 file without soft-capping or window keys runs llama.cpp's defaults (50, 30,
    4096); a Gemma 3 file without rope.freq_base_swa has θ 10000 on its sliding layers."""
    _, src = written("gemma2")
    keys = ("attn_logit_softcapping", "final_logit_softcapping", "attention.sliding_window")
    bare = rewrite(src, tmp_path / "g2.gguf", dict.fromkeys(f"gemma2.{k}" for k in keys), {})
    cfg = load_model(bare).config
    assert isinstance(cfg, ModelConfig)
    assert (cfg.attn_softcap, cfg.final_softcap, cfg.sliding_window) == (50.0, 30.0, 4096)
    _, src = written("gemma3_pattern")
    bare = rewrite(src, tmp_path / "g3.gguf", {"gemma3.rope.freq_base_swa": None}, {})
    cfg = load_model(bare).config
    assert isinstance(cfg, ModelConfig)
    assert cfg.rope_theta_local == 1e4 and cfg.layer_types == ("full", "sliding")
