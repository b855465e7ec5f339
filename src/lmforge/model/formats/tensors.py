"""State dicts under a family's Hugging Face names ↔ ours, from the family's `layer_names` table.

Our names are HF Llama's with Q/K/V and gate/up fused (`families.FUSED`) and the norms named by
where they sit (transformer.py). GPT-2 stores its Conv1D weights transposed ([in, out]).
Both directions rename in place where they can: loading peaks at one layer above the model.
"""

from __future__ import annotations

import torch

from lmforge.model.config import ModelConfig
from lmforge.model.formats.families import FAMILIES, FUSED, ROW_TENSORS

LAYERS = "model.layers."
_GPT2_TOP = {
    "wte.weight": "model.embed_tokens.weight",
    "wpe.weight": "model.embed_positions.weight",
    "ln_f.weight": "model.norm.weight",
    "ln_f.bias": "model.norm.bias",
}
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _split_layer(name: str, prefix: str) -> tuple[str, str, str] | None:
    """'<prefix>N.module.path.kind' → (N, module.path, kind)."""
    if not name.startswith(prefix):
        return None
    idx, rest = name[len(prefix) :].split(".", 1)
    module, _, kind = rest.rpartition(".")
    return idx, module, kind


def hf_to_ours(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """SD (HF names of CONFIG's family) renamed and fused to ours, in place."""
    family = FAMILIES[config.arch]
    gpt2 = not family.llama_keys
    prefix = "h." if gpt2 else LAYERS
    for name in list(sd):
        tensor = sd.pop(name)
        if gpt2:
            name = name.removeprefix("transformer.")
            if name in _GPT2_TOP:
                sd[_GPT2_TOP[name]] = tensor
                continue
        parts = _split_layer(name, prefix)
        if parts is None:
            sd[name] = tensor  # embeddings, final norm, head; anything else is refused later
            continue
        idx, module, kind = parts
        if module not in family.layer_names:
            if gpt2 and module == "attn" and kind in ("bias", "masked_bias"):
                continue  # GPT-2's causal-mask buffers, not weights
            sd[name if not gpt2 else f"{LAYERS}{idx}.{module}.{kind}"] = tensor
            continue
        if gpt2 and module in _CONV1D and kind == "weight":
            tensor = tensor.t().contiguous()
        sd[f"{LAYERS}{idx}.{family.layer_names[module]}.{kind}"] = tensor
    return fuse_layers(sd, config.n_layer)


def fuse_layers(sd: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """SD (our names, Q/K/V and gate/up as their `FUSED` pieces) with the pieces fused, in
    place."""
    for i in range(n_layer):
        p = f"{LAYERS}{i}."
        for fused, pieces in FUSED.items():
            for kind in ROW_TENSORS:
                names = [f"{p}{x}.{kind}" for x in pieces]
                if all(n in sd for n in names):
                    sd[f"{p}{fused}.{kind}"] = torch.cat([sd.pop(n) for n in names], dim=0)
    return sd


def fused_sizes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Rows of each piece of our fused layers (`FUSED` order)."""
    qd, kvd = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    return {"self_attn.qkv_proj": (qd, kvd, kvd), "mlp.gate_up_proj": (config.d_ff, config.d_ff)}


def piece_of(sd: dict[str, torch.Tensor], name: str, config: ModelConfig) -> torch.Tensor | None:
    """Tensor NAME of SD (our names), where NAME may be a piece of a fused layer
    (`model.layers.3.self_attn.k_proj.bias`); None if SD has no such tensor."""
    if name in sd:
        return sd[name]
    parts = _split_layer(name, LAYERS)
    if parts is None:
        return None
    idx, module, kind = parts
    for fused, pieces in FUSED.items():
        whole = sd.get(f"{LAYERS}{idx}.{fused}.{kind}")
        if module in pieces and whole is not None:
            return whole.split(fused_sizes(config)[fused])[pieces.index(module)]
    return None


def ours_to_hf(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """SD (our names) split and renamed to CONFIG's family's HF names, contiguous."""
    family = FAMILIES[config.arch]
    theirs = {ours: hf for hf, ours in family.layer_names.items()}
    sizes = fused_sizes(config)
    gpt2 = not family.llama_keys
    top = {ours: hf for hf, ours in _GPT2_TOP.items()}
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        parts = _split_layer(name, LAYERS)
        if parts is None:
            out[f"transformer.{top[name]}" if gpt2 and name in top else name] = t.contiguous()
            continue
        idx, module, kind = parts
        pieces = FUSED.get(module, ())
        if pieces and module not in theirs and kind in ROW_TENSORS:
            for piece, value in zip(pieces, t.split(sizes[module]), strict=True):
                out[f"{LAYERS}{idx}.{theirs[piece]}.{kind}"] = value.contiguous()
            continue
        hf = theirs[module]
        if gpt2:
            value = t.t() if hf in _CONV1D and kind == "weight" else t
            out[f"transformer.h.{idx}.{hf}.{kind}"] = value.contiguous()
        else:
            out[f"{LAYERS}{idx}.{hf}.{kind}"] = t.contiguous()
    return out
