"""LoRA adapters on the Transformer's linear layers: add, save small, load, merge.

A target is a projection by its usual name — q, k, v, o, gate, up, down (and `lm_head`). Our
model fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`, so an adapter on `q` is a
low-rank update of the q rows of the fused weight only: each `LoraLinear` holds one (A, B) pair
per targeted row slice of the layer it wraps, and adds `scale · B·A·x` to those output rows.
B starts at zero, so a freshly adapted model computes exactly what its base computes.

`merge_lora` folds every update into the base weights (W[rows] += scale · B·A) and puts the
plain layers back: the result is an ordinary model with no trace of the adapters.
`lora_state_dict` holds only the adapter tensors (what `--lora` saves); `load_lora_state`
puts them back into a model adapted with the same settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model.transformer import Linear, Transformer

TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise LmforgeError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise LmforgeError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise LmforgeError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise LmforgeError(
                f"unknown LoRA target(s) {', '.join(unknown) or '(none)'}; "
                f"choose from {', '.join(TARGETS)}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoraLinear(nn.Module):
    """A frozen base `Linear` plus low-rank updates of some of its output rows."""

    def __init__(
        self, base: nn.Linear, slices: dict[str, tuple[int, int]], config: LoraConfig
    ) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.slices = dict(slices)  # target name → (first row, end row)
        self.scale = config.scale
        self.dropout = config.dropout
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        k = base.in_features
        for name, (start, end) in self.slices.items():
            a = torch.empty(config.rank, k, dtype=base.weight.dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear (and PEFT) do
            self.lora_a[name] = nn.Parameter(a)
            self.lora_b[name] = nn.Parameter(
                torch.zeros(
                    end - start, config.rank, dtype=base.weight.dtype, device=base.weight.device
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = nn.functional.dropout(x, self.dropout, self.training) if self.dropout else x
        pieces: list[torch.Tensor] = []
        at = 0
        for name, (start, end) in sorted(self.slices.items(), key=lambda s: s[1]):
            if start > at:
                pieces.append(y.new_zeros(*y.shape[:-1], start - at))
            update = (h @ self.lora_a[name].t()) @ self.lora_b[name].t()
            pieces.append(update * self.scale)
            at = end
        if at < y.shape[-1]:
            pieces.append(y.new_zeros(*y.shape[:-1], y.shape[-1] - at))
        return y + torch.cat(pieces, dim=-1)

    def merged_weight(self) -> torch.Tensor:
        w = self.base.weight.detach().clone()
        for name, (start, end) in self.slices.items():
            delta = self.lora_b[name].detach() @ self.lora_a[name].detach()
            w[start:end] += (delta * self.scale).to(w.dtype)
        return w


def _slices(model: Transformer, config: LoraConfig) -> dict[str, dict[str, tuple[int, int]]]:
    """Module path → {target: row slice} for every layer CONFIG's targets touch."""
    c = model.config
    qd, kvd = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    wanted = set(config.targets)
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for i in range(c.n_layer):
        prefix = f"model.layers.{i}"
        qkv = {"q": (0, qd), "k": (qd, qd + kvd), "v": (qd + kvd, qd + 2 * kvd)}
        picked = {t: s for t, s in qkv.items() if t in wanted}
        if picked:
            out[f"{prefix}.self_attn.qkv_proj"] = picked
        if "o" in wanted:
            out[f"{prefix}.self_attn.o_proj"] = {"o": (0, c.d_model)}
        if c.mlp == "gated":
            gate_up = {"gate": (0, c.d_ff), "up": (c.d_ff, 2 * c.d_ff)}
            picked = {t: s for t, s in gate_up.items() if t in wanted}
            if picked:
                out[f"{prefix}.mlp.gate_up_proj"] = picked
        elif "up" in wanted:
            out[f"{prefix}.mlp.up_proj"] = {"up": (0, c.d_ff)}
        if "down" in wanted:
            out[f"{prefix}.mlp.down_proj"] = {"down": (0, c.d_model)}
    if "lm_head" in wanted:
        if c.tie_embeddings:
            raise LmforgeError("LoRA target lm_head: this model ties it to the embeddings")
        out["lm_head"] = {"lm_head": (0, c.vocab_size)}
    return out


def _swap(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def apply_lora(model: Transformer, config: LoraConfig) -> list[str]:
    """Freeze MODEL and wrap the targeted layers with adapters; return their module paths."""
    plan = _slices(model, config)
    if not plan:
        raise LmforgeError(
            f"LoRA targets {', '.join(config.targets)} match no layer of this "
            f"{model.config.arch} model"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for path, slices in plan.items():
        base = model.get_submodule(path)
        if not isinstance(base, nn.Linear):
            raise LmforgeError(f"{path} is not a linear layer (already adapted?)")
        _swap(model, path, LoraLinear(base, slices, config))
    return sorted(plan)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters' tensors, keyed by their names in MODEL."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if ".lora_" in name}


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put adapter tensors saved by `lora_state_dict` into MODEL (adapted the same way)."""
    own = dict(model.named_parameters())
    expected = {name for name in own if ".lora_" in name}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise LmforgeError(
            f"LoRA adapters do not fit this model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            if own[name].shape != tensor.shape:
                raise LmforgeError(
                    f"LoRA adapter {name}: shape {tuple(tensor.shape)}, "
                    f"the model wants {tuple(own[name].shape)} (another rank or model?)"
                )
            own[name].copy_(tensor)


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight and restore plain layers (in place)."""
    adapted = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    for path, module in adapted:
        base = module.base
        plain = Linear(base.in_features, base.out_features, bias=base.bias is not None)
        plain = plain.to(dtype=base.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(module.merged_weight())
            if base.bias is not None:
                plain.bias.copy_(base.bias)
        _swap(model, path, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
