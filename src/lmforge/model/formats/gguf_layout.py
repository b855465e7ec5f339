"""Each family's GGUF layout (llama.cpp's architecture, tensor names, metadata keys) ↔ features.

A `GGUFLayout` is data, attached to its family in `families.py` (`Family.gguf`) and shared by
`gguf_read.py` and `gguf_write.py`: the `general.architecture` llama.cpp knows it by, one table
from GGUF block tensors to ours, and the facts in which files differ from our model. The facts,
from llama.cpp's converter (`convert_hf_to_gguf.py`, `conversion/*.py`), its model loader
(`src/models/<arch>.cpp`, `llama-model.cpp`) and `gguf-py` (`constants.py`, `tensor_mapping.py`):

- Q/K rows: only `llama` (and `smollm3`, which is llama) runs llama.cpp's interleaved ("normal")
  RoPE, so its converter permutes the rows of attn_q and attn_k (weights and biases) per head
  (on NoPE layers too: Q and K alike, so scores do not change); qwen2, qwen3, gemma2, gemma3,
  olmo2 and phi3 run NEOX RoPE (rotate-half, as Hugging Face does) on rows as they are.
- Gemma's norms compute x̂·(1 + w); the converter stores every `*norm.weight` as w + 1 and
  llama.cpp multiplies by the stored value.
- Names: Gemma's sandwich norms are attn_norm (before attention), post_attention_norm (on its
  output), ffn_norm (before the MLP) and post_ffw_norm (on its output); QK-norm is attn_q_norm /
  attn_k_norm; Phi-3 keeps Q/K/V fused in attn_qkv and gate+up fused in ffn_up ([2·d_ff] rows,
  gate first), as our model does. Gemma 2 has no output.weight (always tied). OLMo 2 has only
  the post-norms (post_attention_norm, post_ffw_norm), QK-norm over all heads (attn_q_norm of
  d_model, attn_k_norm of n_kv_head·head_dim), and must have output.weight; an olmo2 file with
  `attention.sliding_window` is OLMo 3 (sliding layers with their own θ), refused. SmolLM3 is
  llama (interleaved RoPE, permuted rows) whose loader skips RoPE on every 4th layer, whatever
  the file says: no key for it, and no other NoPE pattern can be written.
- Metadata, `{arch}.…`: `attention.sliding_window` (Gemma 2 assumes 4096 when absent),
  `attention.sliding_window_pattern` (llama.cpp's default period is Gemma 2's 2 and Gemma 3's 6,
  the last layer of each period global: our `SLIDING_PATTERNS`; a per-layer bool array says any
  other mix), `rope.freq_base_swa` (θ of sliding layers; Gemma 3 assumes 10000 when absent),
  `attn_logit_softcapping` / `final_logit_softcapping` (Gemma 2 assumes 50 / 30 when absent;
  Gemma 3 never caps scores), `rope.dimension_count` (partial rotary), `attention.key_length` /
  `value_length` (head_dim), `rope.scaling.type` / `factor` / `original_context_length` /
  `yarn_beta_fast` / `yarn_beta_slow` (linear, YaRN; llama.cpp reads no YaRN beta for these
  architectures and runs 32 / 1, so other betas are refused on export and read on import as the
  model's own). Llama 3 RoPE scaling is no key but a `rope_freqs.weight` tensor of
  per-frequency divisors (llama only).
- Attention scale: llama.cpp scales scores by head_dim^-½ for every family here, except Gemma 2
  at 46 layers and Gemma 3 at 62 (their 27B models), where it takes (d_model / n_head)^-½; no key
  says otherwise, so `query_pre_attn_scalar` is read from that rule and any other is refused.
- Shapes: llama.cpp's qwen2, olmo2 and phi3 loaders assume n_head·head_dim = d_model.
- RoPE scaling: llama.cpp's gemma2 scales sliding layers as well; ours scales the full layers'
  θ, which sliding layers share unless they have their own (`rope_theta_local`).
- Phi-3's sliding window is written and read (it is the model's), though this llama.cpp ignores
  it ("Phi SWA is currently disabled"): the two agree up to the window's length.

`config_from_gguf` reads a file's metadata into a ModelConfig and refuses (one line) what lmforge
cannot run; `gguf_metadata` is the inverse and `check_gguf_writable` refuses (one line) a model
whose features the family's llama.cpp architecture cannot express.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmforge.errors import CorruptArtifactError, LmforgeError
from lmforge.model.config import FAMILY_FEATURES, ModelConfig, default_layer_types


@dataclass(frozen=True)
class GGUFLayout:
    arch: str
    """`general.architecture`: llama.cpp's name for the family."""
    tensors: dict[str, str]
    """GGUF block tensor (`blk.N.<name>.weight|bias`) → our module; Q/K/V and gate/up as their
    `families.FUSED` pieces where the file keeps them apart."""
    keys: tuple[str, ...] = ()
    """Optional `{arch}.` metadata keys its llama.cpp architecture reads (beyond the ones every
    file has); a feature whose key is not here cannot be written."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """What llama.cpp assumes for a key the file leaves out, where that is not "off"."""
    interleaved_rope: bool = False
    """Q/K rows permuted per head for llama.cpp's interleaved RoPE (`llama`, `smollm3`)."""
    norm_shift: float = 0.0
    """Added to every norm weight in the file (Gemma: w + 1)."""
    output: bool = True
    """May hold its own output.weight (else the LM head is always the embeddings)."""
    output_required: bool = False
    """llama.cpp's loader requires output.weight (OLMo 2): a tied LM head cannot be written."""
    fixed_layer_types: bool = False
    """llama.cpp runs the family's default `layer_types` whatever the file says (SmolLM3: NoPE
    on every 4th layer); any other pattern cannot be written."""
    refused: dict[str, str] = field(default_factory=dict)
    """`{arch}.` keys that mean a model this layout does not describe, if present and not 0
    (OLMo 3's sliding window in an olmo2 file) → what to say."""
    biases: tuple[str, ...] = ()
    """Bias features its llama.cpp loader takes (qkv_bias, o_bias, mlp_bias)."""
    square_attention: bool = False
    """llama.cpp assumes n_head·head_dim = d_model (qwen2, phi3)."""
    rope_freqs: bool = False
    """Llama 3 RoPE scaling as a `rope_freqs.weight` tensor."""
    wide_scale_layers: int = 0
    """At this depth llama.cpp scales attention by (d_model / n_head)^-½ (Gemma 27B)."""
    scaled_sliding: bool = False
    """llama.cpp applies RoPE scaling to sliding layers too (Gemma 2); ours scales only the
    full layers' θ, so a separate sliding θ with scaling cannot be expressed."""


TOP = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
"""GGUF top-level tensors → ours (suffix .weight), every family."""

_LLAMA_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_SANDWICH = {"post_attention_norm": "attn_output_norm", "post_ffw_norm": "mlp_output_norm"}
_PHI3_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA_KEYS = (
    "attention.key_length",
    "attention.value_length",
    "attention.sliding_window",
    "attention.sliding_window_pattern",
    "rope.freq_base_swa",
    "final_logit_softcapping",
)

LLAMA = GGUFLayout(
    "llama",
    _LLAMA_TENSORS,
    keys=("vocab_size", "rope.dimension_count"),
    interleaved_rope=True,
    biases=("qkv_bias", "o_bias", "mlp_bias"),
    rope_freqs=True,
)
SMOLLM3 = GGUFLayout(  # llama with NoPE on every 4th layer (hard-coded in llama.cpp's loader)
    "smollm3",
    _LLAMA_TENSORS,
    keys=("vocab_size", "rope.dimension_count"),
    interleaved_rope=True,
    fixed_layer_types=True,
)
QWEN2 = GGUFLayout("qwen2", _LLAMA_TENSORS, biases=("qkv_bias",), square_attention=True)
QWEN3 = GGUFLayout("qwen3", {**_LLAMA_TENSORS, **_QK_NORM}, biases=("qkv_bias",))
GEMMA2 = GGUFLayout(
    "gemma2",
    {**_LLAMA_TENSORS, **_SANDWICH},
    keys=(*_GEMMA_KEYS, "attn_logit_softcapping"),
    defaults={
        "attention.sliding_window": 4096,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
    norm_shift=1.0,
    output=False,
    wide_scale_layers=46,
    scaled_sliding=True,
)
GEMMA3 = GGUFLayout(
    "gemma3",
    {**_LLAMA_TENSORS, **_QK_NORM, **_SANDWICH},
    keys=_GEMMA_KEYS,
    defaults={"rope.freq_base_swa": 10000.0},
    norm_shift=1.0,
    wide_scale_layers=62,
)
OLMO2 = GGUFLayout(  # post-norms only, QK-norm over all heads; llama.cpp needs output.weight
    "olmo2",
    {
        **{k: v for k, v in _LLAMA_TENSORS.items() if not k.endswith("_norm")},
        **_QK_NORM,
        **_SANDWICH,
    },
    square_attention=True,
    output_required=True,
    refused={"attention.sliding_window": "OLMo 3's sliding-window layers are not supported"},
)
PHI3 = GGUFLayout(
    "phi3",
    _PHI3_TENSORS,
    keys=(
        "rope.dimension_count",
        "rope.scaling.original_context_length",
        "attention.sliding_window",
    ),
    biases=("qkv_bias",),
    square_attention=True,
)

# Our tensors whose rows the interleaved-RoPE permutation reorders, and their head counts.
ROPE_ROWS = {"self_attn.q_proj": "n_head", "self_attn.k_proj": "n_kv_head"}

# ---------------------------------------------------------------------------------------------
# Metadata keys

# Value types of the `{arch}.` keys written (llama.cpp checks them on load).
_U32, _F32, _STR = "uint32", "float32", "string"
KEY_TYPES = {
    "vocab_size": _U32,
    "context_length": _U32,
    "embedding_length": _U32,
    "block_count": _U32,
    "feed_forward_length": _U32,
    "attention.head_count": _U32,
    "attention.head_count_kv": _U32,
    "rope.freq_base": _F32,
    "attention.layer_norm_rms_epsilon": _F32,
    "attention.key_length": _U32,
    "attention.value_length": _U32,
    "rope.dimension_count": _U32,
    "attention.sliding_window": _U32,
    "attention.sliding_window_pattern": "bool array",
    "rope.freq_base_swa": _F32,
    "attn_logit_softcapping": _F32,
    "final_logit_softcapping": _F32,
    "rope.scaling.type": _STR,
    "rope.scaling.factor": _F32,
    "rope.scaling.original_context_length": _U32,
    "rope.scaling.yarn_beta_fast": _F32,
    "rope.scaling.yarn_beta_slow": _F32,
}

# Keys that change what llama.cpp computes and lmforge cannot run: the harmless values.
_UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "expert_count": ((0,), "mixture-of-experts models are not supported"),
    "attention.layer_norm_epsilon": ((), "LayerNorm models are not supported"),
    "attention.clamp_kqv": ((0.0,), "clamped Q/K/V are not supported"),
    "attention.causal": ((True,), "non-causal attention is not supported"),
    "attention.key_length_swa": ((), "another head size on sliding layers is not supported"),
    "attention.value_length_swa": ((), "another head size on sliding layers is not supported"),
    "rope.dimension_count_swa": ((), "another rotary size on sliding layers is not supported"),
    "rope.dimension_sections": ((), "multi-section RoPE is not supported"),
    "rope.scaling.attn_factor": ((1.0,), "a RoPE attention factor is not supported"),
    "rope.scaling.yarn_log_multiplier": ((0.0,), "YaRN log multipliers are not supported"),
    "rope.scaling.yarn_attn_factor": ((1.0,), "a YaRN attention factor is not supported"),
    "rope.scaling.yarn_ext_factor": ((1.0, -1.0), "a YaRN extrapolation factor is not supported"),
}
_YARN_KEYS = {  # our rope_scaling key → the GGUF key
    "original_max_position_embeddings": "rope.scaling.original_context_length",
    "beta_fast": "rope.scaling.yarn_beta_fast",
    "beta_slow": "rope.scaling.yarn_beta_slow",
}
_YARN_UNWRITABLE = ("attention_factor", "mscale", "mscale_all_dim")
# llama.cpp's loaders for these architectures do not read the beta keys (the converter writes
# them): any other value would run differently there. Read back, they are the model's own.
_YARN_BETAS = {"beta_fast": 32.0, "beta_slow": 1.0}
LLAMA3_OLD_CONTEXT = 8192  # the converter's default original_max_position_embeddings


_PER_LAYER = ("attention.head_count", "attention.head_count_kv", "feed_forward_length")


def _scalar(value: Any, key: str, source: str) -> Any:
    """A per-layer array (OpenELM-style) of one value as that value; of several, refused."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise LmforgeError(f"{source}: per-layer {key} values are not supported")
        return value[0]
    return value


def config_from_gguf(
    family: str,
    layout: GGUFLayout,
    meta: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    rope_freqs: np.ndarray | None,
    source: str,
) -> ModelConfig:
    """The ModelConfig of a GGUF file of FAMILY (its metadata META, tensor SHAPES in numpy
    order, the dequantized rope_freqs tensor if any): what llama.cpp runs, keys it assumes
    included, but for Phi-3's window and YaRN betas, which it ignores (the module docstring)."""
    arch = layout.arch

    def get(key: str, default: Any = None, *, required: bool = False) -> Any:
        value = meta.get(f"{arch}.{key}")
        if key in _PER_LAYER:
            value = _scalar(value, key, source)
        if value is None:
            if required:
                raise CorruptArtifactError(f"{source}: GGUF metadata lacks {arch}.{key}")
            return layout.defaults.get(key, default)
        return value

    for key, (harmless, what) in _UNSUPPORTED.items():
        value = meta.get(f"{arch}.{key}")
        if value is not None and value not in harmless:
            raise LmforgeError(f"{source}: {what} ({arch}.{key} = {value})")
    for key, what in layout.refused.items():
        if meta.get(f"{arch}.{key}") not in (None, 0):
            raise LmforgeError(f"{source}: {what} ({arch}.{key} = {meta[f'{arch}.{key}']})")

    d_model = int(get("embedding_length", required=True))
    n_head = int(get("attention.head_count", required=True))
    n_layer = int(get("block_count", required=True))
    head_dim = int(get("attention.key_length", d_model // n_head))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise LmforgeError(f"{source}: value heads of another size than key heads")
    rotary = int(get("rope.dimension_count", head_dim))
    if layout.interleaved_rope and rotary != head_dim:
        raise LmforgeError(f"{source}: {arch} with partial rotary ({rotary} of {head_dim} dims)")
    if "token_embd.weight" not in shapes:
        raise CorruptArtifactError(f"{source}: GGUF file lacks token_embd.weight")
    eps = get("attention.layer_norm_rms_epsilon", required=True)
    fields: dict[str, Any] = {
        "vocab_size": shapes["token_embd.weight"][0],
        "d_model": d_model,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_kv_head": int(get("attention.head_count_kv", n_head)),
        "d_ff": int(get("feed_forward_length", required=True)),
        "head_dim": head_dim,
        "max_seq_len": int(get("context_length", 2048)),
        "norm_eps": float(eps),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rotary_fraction": rotary / head_dim,
        "tie_embeddings": "output.weight" not in shapes,
        "rope_scaling": _rope_scaling_from_gguf(layout, get, rope_freqs, rotary, source),
    }
    # Biases are optional tensors in llama.cpp's loaders: the file says which there are.
    names = {name.split(".", 2)[-1] for name in shapes if name.startswith("blk.")}
    fields["qkv_bias"] = bool({"attn_q.bias", "attn_qkv.bias"} & names)
    fields["o_bias"] = "attn_output.bias" in names
    fields["mlp_bias"] = bool({"ffn_up.bias", "ffn_down.bias"} & names)
    if "attention.sliding_window" in layout.keys:
        theta = float(fields["rope_theta"])
        fields.update(_sliding_from_gguf(family, layout, get, n_layer, theta, source))
    if "attn_logit_softcapping" in layout.keys:
        fields["attn_softcap"] = float(get("attn_logit_softcapping", 0.0))
    else:
        fields["attn_softcap"] = 0.0
    if "final_logit_softcapping" in layout.keys:
        fields["final_softcap"] = float(get("final_logit_softcapping", 0.0))
    if layout.wide_scale_layers and n_layer == layout.wide_scale_layers:
        fields["query_pre_attn_scalar"] = float(d_model // n_head)
    if fields.get("query_pre_attn_scalar") == head_dim:
        fields["query_pre_attn_scalar"] = 0.0
    if layout.scaled_sliding and fields["rope_scaling"] and fields.get("rope_theta_local"):
        raise LmforgeError(f"{source}: {arch} with RoPE scaling and its own sliding-layer θ")
    try:
        return ModelConfig(arch=family, **fields)
    except (TypeError, ValueError) as exc:
        raise CorruptArtifactError(f"{source}: {exc}") from None


def _sliding_from_gguf(
    family: str, layout: GGUFLayout, get: Any, n_layer: int, rope_theta: float, source: str
) -> dict[str, Any]:
    """sliding_window, layer_types and rope_theta_local, as llama.cpp's loader derives them."""
    window = int(get("attention.sliding_window", 0))
    if window <= 0:
        return {"sliding_window": 0, "layer_types": ("full",) * n_layer}
    pattern = get("attention.sliding_window_pattern")
    if isinstance(pattern, list):  # one bool per layer
        if len(pattern) < n_layer:
            msg = f"{source}: sliding_window_pattern has {len(pattern)} entries for {n_layer}"
            raise CorruptArtifactError(msg)
        types = tuple("sliding" if p else "full" for p in pattern[:n_layer])
    elif pattern is not None:  # llama.cpp's `set_swa_pattern`: the last of every N is global
        n = int(pattern)
        types = tuple("sliding" if n == 0 or i % n < n - 1 else "full" for i in range(n_layer))
    else:
        types = default_layer_types(family, n_layer, window)
    out: dict[str, Any] = {"sliding_window": window, "layer_types": types}
    if "rope.freq_base_swa" in layout.keys and "sliding" in types:
        local = float(get("rope.freq_base_swa", rope_theta))
        if local != rope_theta or FAMILY_FEATURES[family].get("rope_theta_local"):
            out["rope_theta_local"] = local
    return out


def _rope_scaling_from_gguf(
    layout: GGUFLayout, get: Any, rope_freqs: np.ndarray | None, rotary: int, source: str
) -> dict[str, Any] | None:
    kind = str(get("rope.scaling.type", "linear"))
    factor = float(get("rope.scaling.factor", 0.0) or 0.0)
    old = get("rope.scaling.original_context_length")
    if rope_freqs is not None:
        if not layout.rope_freqs:
            raise LmforgeError(f"{source}: {layout.arch} with rope_freqs.weight is not supported")
        if factor not in (0.0, 1.0):
            raise LmforgeError(f"{source}: rope_freqs.weight and a RoPE scaling factor together")
        theta = float(get("rope.freq_base", 10000.0))
        return llama3_scaling_from_factors(
            rope_freqs, rotary, theta, int(old or LLAMA3_OLD_CONTEXT), source
        )
    if kind == "none" or (kind == "linear" and factor in (0.0, 1.0)):
        return None
    if kind == "linear":
        return {"type": "linear", "factor": factor}
    if kind == "yarn":
        out: dict[str, Any] = {"type": "yarn", "factor": factor or 1.0}
        for ours, key in _YARN_KEYS.items():
            value = get(key)
            if value is not None:
                out[ours] = int(value) if ours.startswith("original") else float(value)
        return out
    raise LmforgeError(f"{source}: RoPE scaling {kind!r} is not supported (linear, yarn are)")


# ---------------------------------------------------------------------------------------------
# Llama 3 RoPE scaling as per-frequency divisors (convert_hf_to_gguf.py, LlamaModel)


def llama3_rope_factors(scaling: dict[str, Any], rotary_dim: int, theta: float) -> np.ndarray:
    """rope_freqs.weight [R/2] of a Llama 3 `rope_scaling`: what each frequency is divided by."""
    factor = float(scaling.get("factor", 8.0))
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old = float(scaling.get("original_max_position_embeddings", LLAMA3_OLD_CONTEXT))
    freqs = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim)
    out = []
    for freq in freqs.astype(np.float64):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def llama3_scaling_from_factors(
    factors: np.ndarray, rotary_dim: int, theta: float, old: int, source: str
) -> dict[str, Any] | None:
    """The Llama 3 `rope_scaling` whose `llama3_rope_factors` are FACTORS (OLD: its original
    context, which only scales low/high_freq_factor), or a one-line refusal if none is.

    Between the low- and high-frequency bands the smoothing is linear in each inverse frequency
    u: s(u) = a·u + b with a = old / (2π (high − low)), b = −low / (high − low); a and b are fit
    to the band, and the result is checked against every factor."""
    f = np.asarray(factors, dtype=np.float64).reshape(-1)
    if f.shape[0] != rotary_dim // 2 or not np.all(np.isfinite(f)) or f.min() <= 0:
        raise LmforgeError(f"{source}: rope_freqs.weight has {f.shape[0]} entries, not per dim")
    factor = float(f.max())
    if np.allclose(f, 1.0):
        return None
    u = 1.0 / theta ** (
        np.arange(0, rotary_dim, 2, dtype=np.float32).astype(np.float64) / rotary_dim
    )
    s = (1 / f - 1 / factor) / (1 - 1 / factor)  # 0 in the low band, 1 in the high band
    band = (s > 1e-6) & (s < 1 - 1e-6)
    if band.sum() >= 2:
        a, b = np.polyfit(u[band], s[band], 1)
    else:  # too few points to fit: a ramp that keeps every dim well inside its band
        lo = u[s <= 1e-6].max(initial=0.0)  # the highest inverse frequency divided by `factor`
        hi = u[s >= 1 - 1e-6].min(initial=2 * u.max())  # the lowest one left as it is
        if band.any():  # through the one point, reaching 0 and 1 halfway to its neighbours
            um, sm = float(u[band][0]), float(s[band][0])
            a = 2 * max(sm / (um - lo), (1 - sm) / (hi - um))
        else:  # from 0 at a third of the way from lo to hi to 1 at two thirds
            um, sm = (lo + hi) / 2, 0.5
            a = 3 / (hi - lo)
        b = sm - a * um
    scaling: dict[str, Any] | None = None
    if a > 0:
        width = old / (2 * math.pi * a)
        low = float(f"{-b * width:.6g}")
        high = float(f"{low + width:.6g}")
        if 0 < low < high:
            scaling = {
                "type": "llama3",
                "factor": float(f"{factor:.6g}"),
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": old,
            }
    if scaling is None or not np.allclose(
        llama3_rope_factors(scaling, rotary_dim, theta), f, rtol=1e-4
    ):
        raise LmforgeError(f"{source}: rope_freqs.weight does not follow Llama 3 RoPE scaling")
    return scaling


# ---------------------------------------------------------------------------------------------
# Writing


def check_gguf_writable(c: ModelConfig, layout: GGUFLayout, source: str) -> None:
    """Refuse (one line) features llama.cpp's `layout.arch` cannot run as lmforge does."""
    where = f"{source}: {c.arch} GGUF"
    for feature in ("qkv_bias", "o_bias", "mlp_bias"):
        if getattr(c, feature) and feature not in layout.biases:
            raise LmforgeError(f"{where}: llama.cpp's {layout.arch} has no {feature}")
    if layout.square_attention and c.n_head * c.head_dim != c.d_model:
        raise LmforgeError(
            f"{where}: llama.cpp's {layout.arch} needs n_head·head_dim = d_model "
            f"({c.n_head}·{c.head_dim} ≠ {c.d_model})"
        )
    if layout.interleaved_rope and c.rotary_fraction != 1.0:
        raise LmforgeError(f"{where}: llama.cpp's {layout.arch} rotates whole heads")
    if not layout.output and not c.tie_embeddings:
        raise LmforgeError(f"{where}: llama.cpp's {layout.arch} ties the LM head to embeddings")
    types = tuple(c.layer_types or ())
    fixed = default_layer_types(c.arch, c.n_layer, 0)
    if layout.fixed_layer_types and types != fixed:
        raise LmforgeError(
            f"{where}: llama.cpp's {layout.arch} runs layer_types {list(fixed)}, not {list(types)}"
        )
    if "nope" in types and not layout.fixed_layer_types:
        raise LmforgeError(f"{where}: llama.cpp's {layout.arch} has no NoPE layers")
    if layout.output_required and c.tie_embeddings:
        raise LmforgeError(
            f"{where}: llama.cpp's {layout.arch} needs its own output.weight; a tied LM head "
            "cannot be written"
        )
    wide = layout.wide_scale_layers and c.n_layer == layout.wide_scale_layers
    scalar = float(c.d_model // c.n_head) if wide else float(c.head_dim)
    if (c.query_pre_attn_scalar or c.head_dim) != scalar:
        raise LmforgeError(
            f"{where}: llama.cpp scales attention by {scalar:g}^-½ here, not "
            f"query_pre_attn_scalar = {c.query_pre_attn_scalar:g}"
        )
    scaling = c.rope_scaling or {}
    kind = scaling.get("type")
    if kind and c.rope_theta_local and layout.scaled_sliding:
        raise LmforgeError(
            f"{where}: llama.cpp's {layout.arch} scales RoPE on sliding layers too; "
            "rope_scaling with rope_theta_local cannot be written"
        )
    if kind == "llama3" and not layout.rope_freqs:
        raise LmforgeError(f"{where}: llama.cpp's {layout.arch} has no Llama 3 RoPE scaling")
    if kind == "yarn":
        odd = [k for k in _YARN_UNWRITABLE if scaling.get(k) is not None]
        if odd or scaling.get("truncate", True) is False:
            what = odd[0] if odd else "truncate=False"
            raise LmforgeError(f"{where}: YaRN with {what} has no GGUF key llama.cpp reads")
        for key, default in _YARN_BETAS.items():
            if scaling.get(key) not in (None, default):
                raise LmforgeError(
                    f"{where}: YaRN {key} = {scaling[key]:g}: llama.cpp's {layout.arch} runs "
                    f"{default:g} whatever the file says"
                )
    written = gguf_metadata(c, layout)
    sliding = "sliding" in types
    needs = {
        "attention.sliding_window": sliding,
        "attention.sliding_window_pattern": "attention.sliding_window_pattern" in written,
        "attn_logit_softcapping": bool(c.attn_softcap),
        "final_logit_softcapping": bool(c.final_softcap),
        "rope.freq_base_swa": sliding and bool(c.rope_theta_local),
    }
    labels = {
        "attention.sliding_window": "sliding-window layers",
        "attention.sliding_window_pattern": f"layer_types {list(types)}",
        "attn_logit_softcapping": f"attn_softcap = {c.attn_softcap:g}",
        "final_logit_softcapping": f"final_softcap = {c.final_softcap:g}",
        "rope.freq_base_swa": f"rope_theta_local = {c.rope_theta_local:g}",
    }
    for key, needed in needs.items():
        if needed and key not in layout.keys:
            raise LmforgeError(f"{where}: llama.cpp's {layout.arch} cannot run {labels[key]}")
    off = {
        "attention.sliding_window": "a model without sliding-window layers",
        "attn_logit_softcapping": "attn_softcap = 0",
        "final_logit_softcapping": "final_softcap = 0",
    }
    for key, default in layout.defaults.items():
        if key not in written:  # llama.cpp would assume the default where we mean "off"
            raise LmforgeError(
                f"{where}: llama.cpp's {layout.arch} assumes {key} = {default} when a file has "
                f"none; {off[key]} cannot be written"
            )


def gguf_metadata(c: ModelConfig, layout: GGUFLayout) -> dict[str, Any]:
    """The `{arch}.` keys (without the prefix) for C, in the converter's order; types in
    `KEY_TYPES`. Call `check_gguf_writable` first."""
    out: dict[str, Any] = {
        "block_count": c.n_layer,
        "context_length": c.max_seq_len,
        "embedding_length": c.d_model,
        "feed_forward_length": c.d_ff,
        "attention.head_count": c.n_head,
        "attention.head_count_kv": c.n_kv_head,
        "rope.freq_base": float(c.rope_theta or 0),
        "attention.layer_norm_rms_epsilon": c.norm_eps,
    }
    if "vocab_size" in layout.keys:
        out["vocab_size"] = c.vocab_size
    if "rope.dimension_count" in layout.keys or c.rotary_dim != c.head_dim:
        out["rope.dimension_count"] = c.rotary_dim
    if "attention.key_length" in layout.keys or c.head_dim != c.d_model // c.n_head:
        out["attention.key_length"] = out["attention.value_length"] = c.head_dim
    scaling = dict(c.rope_scaling or {})
    kind = scaling.pop("type", None)
    if kind == "linear":
        out["rope.scaling.type"] = kind
        out["rope.scaling.factor"] = float(scaling.get("factor") or 1.0)
    elif kind == "yarn":  # rope.py's defaults: the original context is max_seq_len, as in
        # llama.cpp (n_ctx_orig_yarn = context_length), and the factor their ratio
        old = int(scaling.get("original_max_position_embeddings") or c.max_seq_len)
        out["rope.scaling.type"] = kind
        out["rope.scaling.factor"] = float(scaling.get("factor") or c.max_seq_len / old)
        out["rope.scaling.original_context_length"] = old
        for ours, key in _YARN_KEYS.items():
            if scaling.get(ours) is not None and key not in out:
                out[key] = float(scaling[ours])
    elif kind == "llama3":  # the factors are a tensor; the original context lets us read
        # low/high_freq_factor back as they were (llama.cpp uses this key for YaRN only)
        old = scaling.get("original_max_position_embeddings", LLAMA3_OLD_CONTEXT)
        out["rope.scaling.original_context_length"] = int(old)
    if "rope.scaling.original_context_length" in layout.keys:
        old = scaling.get("original_max_position_embeddings") or c.max_seq_len
        out.setdefault("rope.scaling.original_context_length", int(old))
    types = tuple(c.layer_types or ())
    if "sliding" in types:
        out["attention.sliding_window"] = c.sliding_window
        if types != default_layer_types(c.arch, c.n_layer, c.sliding_window):
            out["attention.sliding_window_pattern"] = [t == "sliding" for t in types]
    elif "attention.sliding_window" in layout.keys and "attention.sliding_window" not in (
        layout.defaults  # Gemma 2 would slide by its default: refused by check_gguf_writable
    ):
        out["attention.sliding_window"] = 0
    if "rope.freq_base_swa" in layout.keys:  # Gemma 3 would assume 10000 without it
        out["rope.freq_base_swa"] = float(c.rope_theta_local or c.rope_theta or 0)
    if c.attn_softcap:
        out["attn_logit_softcapping"] = c.attn_softcap
    if c.final_softcap:
        out["final_logit_softcapping"] = c.final_softcap
    return out
