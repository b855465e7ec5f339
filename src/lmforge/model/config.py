"""`ModelConfig`: the shape of a decoder-only Transformer and its architecture as explicit features.

The Transformer (`transformer.py`) reads features only — norm kind and placement, MLP kind and
activation, biases, QK-norm, per-layer attention kind, RoPE θ and scaling, soft-capping, … —
never a family name. A family (`arch`: llama, qwen3, gemma3, gpt2, …) is a label and a set of
default features (`FAMILY_FEATURES`); a feature left at None takes the family's default, and any
can be set on its own (`--arch.qk_norm=head`). How each family's Hugging Face config and tensor
names map onto these features lives in `formats/families.py`.

| feature          | values                                                                   |
|------------------|--------------------------------------------------------------------------|
| `positions`      | `rope` (rotary, per layer) or `learned` (absolute embeddings, GPT-2)     |
| `norm`           | `rms`, `rms_offset` (Gemma: x̂·(1 + w)), `layer` (LayerNorm with bias)    |
| `norm_placement` | `pre` (Llama), `sandwich` (pre and post, Gemma), `post` (OLMo 2)         |
| `mlp`            | `gated` (act(gate)·up) or `plain` (act(up))                              |
| `activation`     | `silu`, `gelu_tanh`, `gelu`                                              |
| `qkv_bias`, `o_bias`, `mlp_bias` | biases on Q/K/V, the output projection, the MLP          |
| `qk_norm`        | `none`, `head` (per head, Qwen3/Gemma 3), `full` (all heads, OLMo 2)     |
| `layer_types`    | per layer: `full`, `sliding` (window `sliding_window`), `nope` (no RoPE) |
| `rope_theta`, `rope_theta_local` | θ of full layers and of sliding layers (0: the same)     |
| `rope_scaling`   | None or {"type": linear / llama3 / yarn, …} (full layers)               |
| `rotary_fraction`| the share of each head's dims that rotate (partial rotary)               |
| `embed_scale`    | multiplies the embeddings (Gemma: √d_model)                              |
| `query_pre_attn_scalar` | attention scale is its −½ power (0: head_dim)                     |
| `attn_softcap`, `final_softcap` | tanh soft-capping of attention scores and logits (0: off) |
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, Self

NORMS = ("rms", "rms_offset", "layer")
PLACEMENTS = ("pre", "sandwich", "post")
MLPS = ("gated", "plain")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
QK_NORMS = ("none", "head", "full")
LAYER_TYPES = ("full", "sliding", "nope")
ROPE_SCALINGS = ("linear", "llama3", "yarn")

_LLAMA: dict[str, Any] = {
    "positions": "rope",
    "norm": "rms",
    "norm_placement": "pre",
    "mlp": "gated",
    "activation": "silu",
    "qkv_bias": False,
    "o_bias": False,
    "mlp_bias": False,
    "qk_norm": "none",
    "rope_theta": 10000.0,
}
_GEMMA: dict[str, Any] = {
    **_LLAMA,
    "norm": "rms_offset",
    "norm_placement": "sandwich",
    "activation": "gelu_tanh",
}

FAMILY_FEATURES: dict[str, dict[str, Any]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": {**_LLAMA, "qkv_bias": True},
    "qwen3": {**_LLAMA, "qk_norm": "head"},
    "gemma2": {**_GEMMA, "attn_softcap": 50.0, "final_softcap": 30.0},
    "gemma3": {**_GEMMA, "qk_norm": "head", "rope_theta": 1e6, "rope_theta_local": 1e4},
    "phi3": _LLAMA,
    "olmo2": {**_LLAMA, "norm_placement": "post", "qk_norm": "full"},
    "smollm3": _LLAMA,
    "gpt2": {
        **_LLAMA,
        "positions": "learned",
        "norm": "layer",
        "mlp": "plain",
        "activation": "gelu_tanh",
        "qkv_bias": True,
        "o_bias": True,
        "mlp_bias": True,
    },
}
"""Each family's default features; a field not named here defaults as declared."""


# Per-layer attention kinds of families that mix them (when sliding_window > 0), and of those
# that leave RoPE out of every N-th layer.
SLIDING_PATTERNS: dict[str, Callable[[int], str]] = {
    "gemma2": lambda i: "sliding" if i % 2 == 0 else "full",
    "gemma3": lambda i: "full" if (i + 1) % 6 == 0 else "sliding",  # 5 local : 1 global
    "mistral": lambda i: "sliding",
    "phi3": lambda i: "sliding",
}
NOPE_EVERY = {"smollm3": 4}


def default_layer_types(arch: str, n_layer: int, sliding_window: int) -> tuple[str, ...]:
    """The family's per-layer attention kinds when a config does not list them."""
    pattern = SLIDING_PATTERNS.get(arch) if sliding_window else None
    if pattern is not None:
        return tuple(pattern(i) for i in range(n_layer))
    every = NOPE_EVERY.get(arch)
    if every:
        return tuple("nope" if (i + 1) % every == 0 else "full" for i in range(n_layer))
    return ("full",) * n_layer


class ConfigDict:
    """to_dict / from_dict for a model's config dataclass (ModelConfig, LSTMConfig)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**data)


@dataclass
class ModelConfig(ConfigDict):
    """Shape and features of a decoder-only Transformer (see the module docstring)."""

    arch: str = "llama"
    """The family: a label (saved as its Hugging Face model_type) and default features."""
    vocab_size: int = 32000
    d_model: int = 512
    n_layer: int = 8
    n_head: int = 8
    n_kv_head: int = 0
    """Key/value heads for grouped-query attention; 0 means `n_head` (multi-head attention)."""
    d_ff: int = 0
    """MLP hidden size; 0 means 4·d_model (plain MLP) or ⌈8/3·d_model⌉ rounded up to 64 (gated)."""
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float | None = None
    tie_embeddings: bool = True
    dropout: float = 0.0
    head_dim: int = 0
    """Per-head size; 0 means d_model // n_head."""
    init_std: float = 0.02
    # Features: None takes the family's default (FAMILY_FEATURES).
    positions: str | None = None
    norm: str | None = None
    norm_placement: str | None = None
    mlp: str | None = None
    activation: str | None = None
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    mlp_bias: bool | None = None
    qk_norm: str | None = None
    layer_types: tuple[str, ...] | None = None
    sliding_window: int = 0
    rope_theta_local: float | None = None
    rope_scaling: dict[str, Any] | None = None
    rotary_fraction: float = 1.0
    embed_scale: float | None = None
    query_pre_attn_scalar: float = 0.0
    attn_softcap: float | None = None
    final_softcap: float | None = None

    def __post_init__(self) -> None:
        if self.arch not in FAMILY_FEATURES:
            raise ValueError(
                f"model.arch {self.arch!r} is not a known family ({', '.join(FAMILY_FEATURES)})"
            )
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        family = FAMILY_FEATURES[self.arch]
        for name, value in family.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.embed_scale is None:
            self.embed_scale = math.sqrt(self.d_model) if self.norm == "rms_offset" else 1.0
        for name in ("attn_softcap", "final_softcap", "rope_theta_local"):
            if getattr(self, name) is None:
                setattr(self, name, 0.0)
        if self.layer_types is None:
            self.layer_types = default_layer_types(self.arch, self.n_layer, self.sliding_window)
        self.layer_types = tuple(self.layer_types)
        self._check_features()
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.n_kv_head < 0 or self.n_head % self.n_kv_head:
            raise ValueError(
                f"model.n_head ({self.n_head}) must be a multiple of model.n_kv_head "
                f"({self.n_kv_head})"
            )
        if self.head_dim == 0:
            if self.d_model % self.n_head:
                raise ValueError(
                    f"model.d_model ({self.d_model}) must be divisible by model.n_head "
                    f"({self.n_head}) unless model.head_dim is set"
                )
            self.head_dim = self.d_model // self.n_head
        if self.positions == "rope" and self.rotary_dim % 2:
            raise ValueError(f"model.head_dim must give an even rotary size, got {self.rotary_dim}")
        if self.d_ff == 0:
            if self.mlp == "plain":
                self.d_ff = 4 * self.d_model
            else:
                self.d_ff = 64 * math.ceil(8 * self.d_model / 3 / 64)
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.norm_eps) and self.norm_eps > 0):
            raise ValueError(f"model.norm_eps must be positive, got {self.norm_eps}")

    def _check_features(self) -> None:
        choices = {
            "positions": ("rope", "learned"),
            "norm": NORMS,
            "norm_placement": PLACEMENTS,
            "mlp": MLPS,
            "activation": ACTIVATIONS,
            "qk_norm": QK_NORMS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"model.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        assert self.layer_types is not None
        if len(self.layer_types) != self.n_layer:
            raise ValueError(
                f"model.layer_types has {len(self.layer_types)} entries for {self.n_layer} layers"
            )
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"model.layer_types: unknown {bad[0]!r} ({', '.join(LAYER_TYPES)})")
        if "sliding" in self.layer_types and self.sliding_window <= 0:
            raise ValueError("model.layer_types has sliding layers but model.sliding_window is 0")
        if self.positions == "learned" and "nope" in self.layer_types:
            raise ValueError("model.layer_types 'nope' needs positions 'rope'")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type")
            if kind not in ROPE_SCALINGS:
                known = ", ".join(ROPE_SCALINGS)
                raise ValueError(f"model.rope_scaling type {kind!r} is not supported ({known})")
        if not 0.0 < self.rotary_fraction <= 1.0:
            raise ValueError(f"model.rotary_fraction must be in (0, 1], got {self.rotary_fraction}")
        for name in ("attn_softcap", "final_softcap", "query_pre_attn_scalar", "sliding_window"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"model.{name} must be ≥ 0, got {value}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        data = dict(data)
        if isinstance(data.get("layer_types"), list):
            data["layer_types"] = tuple(data["layer_types"])
        return super().from_dict(data)

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (all unless `rotary_fraction` < 1)."""
        return int(self.head_dim * self.rotary_fraction)

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.query_pre_attn_scalar or self.head_dim)

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        c, f, d = self.d_model, self.d_ff, self.head_dim
        qd, kvd = self.n_head * d, self.n_kv_head * d
        norm = c * (2 if self.norm == "layer" else 1)
        attn = c * (qd + 2 * kvd) + qd * c
        attn += (qd + 2 * kvd) if self.qkv_bias else 0
        attn += c if self.o_bias else 0
        attn += {"none": 0, "head": 2 * d, "full": qd + kvd}[str(self.qk_norm)]
        mlp = c * f * (3 if self.mlp == "gated" else 2)
        mlp += ((2 * f if self.mlp == "gated" else f) + c) if self.mlp_bias else 0
        norms = {"pre": 2, "sandwich": 4, "post": 2}[str(self.norm_placement)] * norm
        emb = self.vocab_size * c * (1 if self.tie_embeddings else 2)
        pos = self.max_seq_len * c if self.positions == "learned" else 0
        return self.n_layer * (attn + mlp + norms) + emb + pos + norm
