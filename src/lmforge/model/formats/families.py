"""Model families: each one's Hugging Face config ↔ `ModelConfig` features and tensor names.

One `Family` per family, all in `FAMILIES`; nothing else in lmforge knows a family by name. A
family says:

- which `model_type`s it reads and which it writes (`architectures` class, `model_type`);
- `from_hf`: the features and shape a config.json describes (every key that changes the
  computation is read or refused: an unsupported RoPE scaling, a mixture of experts, a vision
  tower are one-line errors naming it);
- `to_hf`: the config.json `transformers` loads unchanged;
- `layer_names`: each of its per-layer tensors (HF name → ours), used to load and to save;
  Q/K/V and gate/up are fused in our model (`FUSED`) and split again for families that keep
  them apart;
- `gguf`: its llama.cpp GGUF layout (`gguf_layout.py`: architecture name, GGUF tensor names →
  ours, how the file differs), shared by the GGUF reader and writer; None where lmforge has no
  GGUF support for the family.

Hugging Face has two spellings of RoPE settings: `rope_theta` + `rope_scaling` (checkpoints
written by transformers 4) and `rope_parameters` (transformers 5, per layer type for Gemma 3).
Both are read; the latter is written.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.formats import gguf_layout
from lmforge.model.formats.gguf_layout import GGUFLayout

# Our fused layers ← the separate ones, concatenated along the output rows; that holds for every
# tensor with one row per output: a weight, a bias, a quantized layer's tensors.
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
ROW_TENSORS = ("weight", "bias", "qweight", "scales", "zeros")

# Per-layer modules under the same name in HF and here (Llama's layout).
_LLAMA_LAYER = {
    name: name
    for name in (
        "input_layernorm",
        "post_attention_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
}
_QK_NORM = {"self_attn.q_norm": "self_attn.q_norm", "self_attn.k_norm": "self_attn.k_norm"}
_GEMMA_LAYER = {
    **_LLAMA_LAYER,
    **_QK_NORM,
    "post_attention_layernorm": "attn_output_norm",  # Gemma's is on the attention output
    "pre_feedforward_layernorm": "post_attention_layernorm",
    "post_feedforward_layernorm": "mlp_output_norm",
}
_OLMO2_LAYER = {
    **{k: v for k, v in _LLAMA_LAYER.items() if "layernorm" not in k},
    **_QK_NORM,
    "post_attention_layernorm": "attn_output_norm",
    "post_feedforward_layernorm": "mlp_output_norm",
}
_FUSED_PARTS = {part for parts in FUSED.values() for part in parts}
_PHI3_LAYER = {  # Phi-3 files keep Q/K/V and gate/up fused, as we do
    **{k: v for k, v in _LLAMA_LAYER.items() if k not in _FUSED_PARTS},
    **{fused: fused for fused in FUSED},
}
GPT2_LAYER = {
    "ln_1": "input_layernorm",
    "ln_2": "post_attention_layernorm",
    "attn.c_attn": "self_attn.qkv_proj",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.c_fc": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}

_HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}
_ACTIVATION_TO_HF = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}
_NOT_GEMMA_FIXED = ("attn_softcap", "final_softcap", "query_pre_attn_scalar", "rope_theta_local")
_ROPE_KEYS_DROPPED = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


@dataclass(frozen=True)
class Family:
    name: str
    """Our label (`ModelConfig.arch`)."""
    hf_class: str
    """The `architectures` entry written, e.g. Qwen3ForCausalLM."""
    model_type: str
    """The `model_type` written."""
    layer_names: dict[str, str]
    """HF per-layer module path → ours (tensor suffixes .weight/.bias/… carried over)."""
    reads: tuple[str, ...] = ()
    """More model_types read as this family."""
    from_hf: Callable[[dict[str, Any], str], dict[str, Any]] | None = None
    """Family-specific ModelConfig fields from a config.json (after the common ones)."""
    to_hf: Callable[[ModelConfig], dict[str, Any]] | None = None
    """Family-specific config.json keys (after the common ones)."""
    qa_prefix: str = "model."
    """Where HF's *ForQuestionAnswering keeps the decoder."""
    fixed: tuple[str, ...] = _NOT_GEMMA_FIXED
    """Features its config.json cannot change (beyond the norms, MLP, positions of all)."""
    layer_kinds: tuple[str, ...] = ("full",)
    """Layer types its class can run."""
    uniform_layers: bool = False
    """All layers of one type (a single sliding_window switch)."""
    one_attention_bias: bool = True
    """One `attention_bias` switch for Q/K/V and the output projection."""
    llama_keys: bool = True
    """config.json spells the shape as Llama does (hidden_size, …); GPT-2 has its own names."""
    layer_types_key: bool = False
    """config.json lists `layer_types` (else a `sliding_window` applies to every layer)."""
    gguf: GGUFLayout | None = None
    """Its GGUF layout (llama.cpp architecture, tensor names, metadata), if lmforge has one."""


# ---------------------------------------------------------------------------------------------
# Reading config.json


def _rope_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """rope_theta, rope_scaling, rope_theta_local, rotary_fraction from either spelling."""
    params = hf.get("rope_parameters") or {}
    per_type = isinstance(params, dict) and ("full_attention" in params)
    full = dict(params.get("full_attention") or {}) if per_type else dict(params)
    local = dict(params.get("sliding_attention") or {}) if per_type else {}
    legacy = dict(hf.get("rope_scaling") or {})
    kind = full.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    scaling_src = full if full.get("rope_type", "default") != "default" else legacy
    out: dict[str, Any] = {}
    theta = full.get("rope_theta") or hf.get("rope_theta")
    if theta:
        out["rope_theta"] = float(theta)
    if kind != "default":
        if kind not in ("linear", "llama3", "yarn"):
            raise LmforgeError(
                f"{source}: RoPE scaling {kind!r} is not supported (linear, llama3, yarn are)"
            )
        kept = {k: v for k, v in scaling_src.items() if k not in _ROPE_KEYS_DROPPED}
        out["rope_scaling"] = {"type": kind, **kept}
    if local.get("rope_type", "default") != "default":
        raise LmforgeError(f"{source}: RoPE scaling on sliding-window layers is not supported")
    local_theta = local.get("rope_theta") or hf.get("rope_local_base_freq")
    if local_theta:
        out["rope_theta_local"] = float(local_theta)
    fraction = full.get("partial_rotary_factor") or hf.get("partial_rotary_factor")
    if fraction:
        out["rotary_fraction"] = float(fraction)
    return out


def _refuse_unsupported(hf: dict[str, Any], source: str) -> None:
    """One line for architectures lmforge cannot run: experts, vision towers, …"""
    experts = [k for k in ("num_experts", "num_local_experts", "n_routed_experts") if hf.get(k)]
    if experts:
        raise LmforgeError(
            f"{source}: mixture-of-experts models are not supported ({experts[0]} = "
            f"{hf[experts[0]]}); supported families: {', '.join(supported_model_types())}"
        )
    if "vision_config" in hf or "audio_config" in hf:
        raise LmforgeError(
            f"{source}: multimodal models (a vision or audio tower) are not supported; "
            f"supported families: {', '.join(supported_model_types())}"
        )


def _activation(hf: dict[str, Any], source: str, default: str = "silu") -> str:
    name = hf.get("hidden_activation") or hf.get("hidden_act") or default
    if name not in _HF_ACTIVATIONS:
        raise LmforgeError(f"{source}: activation {name!r} is not supported")
    return _HF_ACTIVATIONS[name]


def _common_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """The Llama-style keys every family but GPT-2 shares."""
    n_head = hf["num_attention_heads"]
    fields: dict[str, Any] = {
        "vocab_size": hf["vocab_size"],
        "d_model": hf["hidden_size"],
        "n_layer": hf["num_hidden_layers"],
        "n_head": n_head,
        "n_kv_head": hf.get("num_key_value_heads") or n_head,
        "d_ff": hf["intermediate_size"],
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // n_head,
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_std": hf.get("initializer_range", 0.02),
        "activation": _activation(hf, source),
        **_rope_from_hf(hf, source),
    }
    bias = bool(hf.get("attention_bias", False))
    fields["qkv_bias"] = fields["o_bias"] = bias
    fields["mlp_bias"] = bool(hf.get("mlp_bias", False))
    window = hf.get("sliding_window")
    types = hf.get("layer_types")
    if types is not None:
        unknown = sorted(set(types) - set(_LAYER_TYPES))
        if unknown:
            raise LmforgeError(f"{source}: layer type {unknown[0]!r} is not supported")
        fields["layer_types"] = tuple(_LAYER_TYPES[t] for t in types)
        if "sliding" in fields["layer_types"]:
            fields["sliding_window"] = int(window or 0)
    elif window:
        fields["sliding_window"] = int(window)
    return fields


def config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    """The ModelConfig a Transformer's config.json describes."""
    _refuse_unsupported(hf, source)
    family = family_for_model_type(hf.get("model_type"), source)
    try:
        fields = _common_from_hf(hf, source) if family.llama_keys else {}
        if family.from_hf is not None:
            fields.update(family.from_hf(hf, source))
        return ModelConfig(arch=family.name, **fields)
    except KeyError as exc:
        raise LmforgeError(f"{source}: config.json lacks {exc}") from None
    except (TypeError, ValueError) as exc:
        raise LmforgeError(f"{source}: {exc}") from None


def _qwen2_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {"qkv_bias": True, "o_bias": False}
    if hf.get("layer_types") is None:  # a transformers 4 config: derive them
        sliding = bool(hf.get("use_sliding_window"))
        first = int(hf.get("max_window_layers") or 0)
        n = hf["num_hidden_layers"]
        kinds = tuple("sliding" if sliding and i >= first else "full" for i in range(n))
        out["layer_types"] = kinds
        out["sliding_window"] = int(hf.get("sliding_window") or 0) if sliding else 0
    elif not hf.get("use_sliding_window", False):
        out["layer_types"], out["sliding_window"] = ("full",) * hf["num_hidden_layers"], 0
    return out


def _qwen3_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    out = _qwen2_from_hf(hf, source)
    out["qkv_bias"] = out["o_bias"] = bool(hf.get("attention_bias", False))
    return out


def _mistral_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    window = int(hf.get("sliding_window") or 0)
    n = hf["num_hidden_layers"]
    return {"sliding_window": window, "layer_types": ("sliding" if window else "full",) * n}


def _gemma_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "activation": _activation(hf, source, "gelu_pytorch_tanh"),
        "query_pre_attn_scalar": float(hf.get("query_pre_attn_scalar") or 0),
        "attn_softcap": float(hf.get("attn_logit_softcapping") or 0),
        "final_softcap": float(hf.get("final_logit_softcapping") or 0),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "embed_scale": math.sqrt(hf["hidden_size"]),
    }
    if hf.get("layer_types") is None and hf.get("sliding_window"):
        pattern = int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 0)
        if pattern:  # Gemma 3 (transformers 4): every pattern-th layer is global
            n = hf["num_hidden_layers"]
            out["layer_types"] = tuple(
                "full" if (i + 1) % pattern == 0 else "sliding" for i in range(n)
            )
    return out


def _phi3_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    window = int(hf.get("sliding_window") or 0)
    n = hf["num_hidden_layers"]
    out: dict[str, Any] = {"sliding_window": window}
    out["layer_types"] = ("sliding" if window else "full",) * n
    return out


def _smollm3_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    n = hf["num_hidden_layers"]
    use_rope = hf.get("no_rope_layers")
    if use_rope is None:
        interval = int(hf.get("no_rope_layer_interval") or 4)
        use_rope = [int((i + 1) % interval != 0) for i in range(n)]
    types = tuple(hf.get("layer_types") or ["full_attention"] * n)
    if "sliding_attention" in types:
        raise LmforgeError(f"{source}: SmolLM3 with sliding-window layers is not supported")
    return {"layer_types": tuple("full" if r else "nope" for r in use_rope), "sliding_window": 0}


def _gpt2_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise LmforgeError(f"{source}: GPT-2 activation {act!r} is not supported")
    return {
        "vocab_size": hf["vocab_size"],
        "d_model": hf["n_embd"],
        "n_layer": hf["n_layer"],
        "n_head": hf["n_head"],
        "d_ff": hf.get("n_inner") or 4 * hf["n_embd"],
        "max_seq_len": hf["n_positions"],
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "tie_embeddings": True,
        "init_std": hf.get("initializer_range", 0.02),
    }


# ---------------------------------------------------------------------------------------------
# Writing config.json


def _rope_to_hf(c: ModelConfig) -> dict[str, Any]:
    full: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        scaling = {k: v for k, v in c.rope_scaling.items() if k != "type"}
        full = {"rope_type": c.rope_scaling["type"], "rope_theta": c.rope_theta, **scaling}
    if c.rotary_fraction != 1.0:
        full["partial_rotary_factor"] = c.rotary_fraction
    if c.rope_theta_local:
        local = {"rope_type": "default", "rope_theta": c.rope_theta_local}
        return {"rope_parameters": {"full_attention": full, "sliding_attention": local}}
    return {"rope_parameters": full}


def _common_to_hf(c: ModelConfig) -> dict[str, Any]:
    assert c.layer_types is not None
    types = [
        {"full": "full_attention", "nope": "full_attention"}.get(t, "sliding_attention")
        for t in c.layer_types
    ]
    return {
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.d_ff,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        **_rope_to_hf(c),
        "hidden_act": _ACTIVATION_TO_HF[str(c.activation)],
        "attention_bias": bool(c.qkv_bias),
        "mlp_bias": bool(c.mlp_bias),
        "attention_dropout": 0.0,
        "sliding_window": c.sliding_window or None,
        **({"layer_types": types} if FAMILIES[c.arch].layer_types_key else {}),
        "initializer_range": c.init_std,
        "tie_word_embeddings": c.tie_embeddings,
    }


def _qwen_to_hf(c: ModelConfig) -> dict[str, Any]:
    sliding = "sliding" in (c.layer_types or ())
    return {"use_sliding_window": sliding, "max_window_layers": c.n_layer}


def _number(x: float) -> int | float:
    """An integral float as an int: transformers' strict config fields want one."""
    return int(x) if float(x).is_integer() else x


def _gemma_to_hf(c: ModelConfig) -> dict[str, Any]:
    return {
        "hidden_activation": _ACTIVATION_TO_HF[str(c.activation)],
        "query_pre_attn_scalar": _number(c.query_pre_attn_scalar or c.head_dim),
        "attn_logit_softcapping": c.attn_softcap or None,
        "final_logit_softcapping": c.final_softcap or None,
    }


def _smollm3_to_hf(c: ModelConfig) -> dict[str, Any]:
    assert c.layer_types is not None
    return {
        "no_rope_layers": [int(t != "nope") for t in c.layer_types],
        "use_sliding_window": False,
    }


def _gpt2_to_hf(c: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": c.vocab_size,
        "n_positions": c.max_seq_len,
        "n_embd": c.d_model,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": c.d_ff,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": c.norm_eps,
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": 0.0,
        "initializer_range": c.init_std,
        "tie_word_embeddings": True,
    }


def config_to_hf(c: ModelConfig) -> dict[str, Any]:
    """config.json for C under its family's class (ids and dtype are added by the caller)."""
    family = FAMILIES[c.arch]
    check_saveable(c)
    out: dict[str, Any] = {"architectures": [family.hf_class], "model_type": family.model_type}
    if family.llama_keys:
        out.update(_common_to_hf(c))
    if family.to_hf is not None:
        out.update(family.to_hf(c))
    return out


def check_saveable(c: ModelConfig) -> None:
    """Refuse a config whose features its family's Hugging Face class cannot express (set by
    `--arch.*` overrides): the saved directory would load in transformers as another model."""
    family = FAMILIES[c.arch]
    default = ModelConfig(
        arch=c.arch,
        vocab_size=c.vocab_size,
        d_model=c.d_model,
        n_layer=c.n_layer,
        n_head=c.n_head,
        head_dim=c.head_dim,
        sliding_window=c.sliding_window,
    )
    for name in (*_FIXED, *family.fixed):
        if getattr(c, name) != getattr(default, name):
            raise LmforgeError(
                f"model feature {name}={getattr(c, name)!r} cannot be saved as {c.arch} "
                f"(its Hugging Face class has {getattr(default, name)!r})"
            )
    kinds = set(c.layer_types or ())
    if not kinds <= set(family.layer_kinds) or (family.uniform_layers and len(kinds) > 1):
        raise LmforgeError(
            f"model.layer_types {sorted(kinds)} cannot be saved as {c.arch} "
            f"({'one of' if family.uniform_layers else 'any of'} {', '.join(family.layer_kinds)})"
        )
    if family.one_attention_bias and c.qkv_bias != c.o_bias:
        raise LmforgeError(f"{c.arch} has one attention_bias: qkv_bias and o_bias must match")


# Features no config.json of ours expresses: always the family's own.
_FIXED = ("positions", "norm", "norm_placement", "mlp", "qk_norm", "embed_scale")

# ---------------------------------------------------------------------------------------------
# The families

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "llama",
            "LlamaForCausalLM",
            "llama",
            _LLAMA_LAYER,
            qa_prefix="transformer.",
            gguf=gguf_layout.LLAMA,
        ),
        Family(
            "mistral",
            "MistralForCausalLM",
            "mistral",
            _LLAMA_LAYER,
            from_hf=_mistral_from_hf,
            layer_kinds=("full", "sliding"),
            uniform_layers=True,
            # llama.cpp runs Mistral as llama (its converter writes MistralForCausalLM so), which
            # has no sliding window: a windowed model is refused, and the file reads back as
            # llama (`family_for_gguf_arch` takes the first family of an architecture).
            gguf=gguf_layout.LLAMA,
        ),
        Family(
            "qwen2",
            "Qwen2ForCausalLM",
            "qwen2",
            _LLAMA_LAYER,
            from_hf=_qwen2_from_hf,
            to_hf=_qwen_to_hf,
            qa_prefix="transformer.",
            fixed=(*_NOT_GEMMA_FIXED, "qkv_bias", "o_bias"),
            one_attention_bias=False,
            layer_types_key=True,
            layer_kinds=("full", "sliding"),
            gguf=gguf_layout.QWEN2,
        ),
        Family(
            "qwen3",
            "Qwen3ForCausalLM",
            "qwen3",
            {**_LLAMA_LAYER, **_QK_NORM},
            from_hf=_qwen3_from_hf,
            to_hf=_qwen_to_hf,
            qa_prefix="transformer.",
            layer_types_key=True,
            layer_kinds=("full", "sliding"),
            gguf=gguf_layout.QWEN3,
        ),
        Family(
            "gemma2",
            "Gemma2ForCausalLM",
            "gemma2",
            {k: v for k, v in _GEMMA_LAYER.items() if k not in _QK_NORM},
            from_hf=_gemma_from_hf,
            to_hf=_gemma_to_hf,
            fixed=(),
            layer_types_key=True,
            layer_kinds=("full", "sliding"),
            gguf=gguf_layout.GEMMA2,
        ),
        Family(
            "gemma3",
            "Gemma3ForCausalLM",
            "gemma3_text",
            _GEMMA_LAYER,
            from_hf=_gemma_from_hf,
            to_hf=_gemma_to_hf,
            fixed=(),
            layer_types_key=True,
            layer_kinds=("full", "sliding"),
            gguf=gguf_layout.GEMMA3,
        ),
        Family(
            "phi3",
            "Phi3ForCausalLM",
            "phi3",
            _PHI3_LAYER,
            from_hf=_phi3_from_hf,
            layer_kinds=("full", "sliding"),
            uniform_layers=True,
            gguf=gguf_layout.PHI3,
        ),
        Family("olmo2", "Olmo2ForCausalLM", "olmo2", _OLMO2_LAYER, gguf=gguf_layout.OLMO2),
        Family(
            "smollm3",
            "SmolLM3ForCausalLM",
            "smollm3",
            _LLAMA_LAYER,
            from_hf=_smollm3_from_hf,
            to_hf=_smollm3_to_hf,
            qa_prefix="transformer.",
            layer_types_key=True,
            layer_kinds=("full", "nope"),
            gguf=gguf_layout.SMOLLM3,
        ),
        Family(
            "gpt2",
            "GPT2LMHeadModel",
            "gpt2",
            GPT2_LAYER,
            from_hf=_gpt2_from_hf,
            to_hf=_gpt2_to_hf,
            qa_prefix="transformer.",
            fixed=(*_NOT_GEMMA_FIXED, "activation", "qkv_bias", "o_bias", "mlp_bias"),
            one_attention_bias=False,
            llama_keys=False,
        ),
    )
}


def supported_model_types() -> list[str]:
    return [f.model_type for f in FAMILIES.values()]


def family_for_model_type(model_type: Any, source: str) -> Family:
    for family in FAMILIES.values():
        if model_type == family.model_type or model_type in family.reads:
            return family
    raise LmforgeError(
        f"{source}: model_type {model_type!r} is not supported "
        f"({', '.join(supported_model_types())} are)"
    )


def gguf_families() -> list[str]:
    """llama.cpp's architectures that families map to, once each."""
    return list(dict.fromkeys(f.gguf.arch for f in FAMILIES.values() if f.gguf is not None))


def gguf_exportable() -> list[str]:
    """The families `export --format gguf` writes."""
    return [f.name for f in FAMILIES.values() if f.gguf is not None]


def family_for_gguf_arch(arch: Any, source: str) -> Family:
    """The family a GGUF file's `general.architecture` names."""
    for family in FAMILIES.values():
        if family.gguf is not None and family.gguf.arch == arch:
            return family
    raise LmforgeError(
        f"{source}: GGUF architecture {arch!r} is not supported ({', '.join(gguf_families())} are)"
    )
