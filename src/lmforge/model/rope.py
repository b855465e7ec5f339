"""Rotary position embeddings: frequency tables (plain, linear, Llama 3, YaRN) and their use.

Tables follow Hugging Face's rotate-half convention over the first `rotary_dim` dims of a head.
`rope_tables` gives cos and a signed sin: rotate_half(x)·sin = cat(-x₂, x₁)·cat(s, s) =
roll(x, R/2)·cat(-s, s), so the sign lives in the table and `apply_rope` needs one roll instead
of two slices, a negation and a cat. Scaling follows the published recipes (the Llama 3.1 and
YaRN papers, as `transformers`' `modeling_rope_utils` computes them): `linear` divides every
frequency by `factor`; `llama3` divides the low frequencies, keeps the high ones and blends
between; `yarn` blends interpolated and extrapolated frequencies by a ramp over the dims and
scales cos/sin by an attention factor.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def inverse_frequencies(
    rotary_dim: int, theta: float, scaling: dict[str, Any] | None, max_seq_len: int
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [R/2] and the factor cos/sin are multiplied by."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq, 1.0
    kind, factor = scaling["type"], float(scaling.get("factor") or 1.0)
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        return _llama3(inv_freq, scaling, factor), 1.0
    if kind == "yarn":
        return _yarn(rotary_dim, theta, scaling, max_seq_len)
    raise ValueError(f"RoPE scaling {kind!r} is not supported")


def _llama3(inv_freq: torch.Tensor, scaling: dict[str, Any], factor: float) -> torch.Tensor:
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_len / low, old_len / high
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn(
    dim: int, theta: float, scaling: dict[str, Any], max_seq_len: int
) -> tuple[torch.Tensor, float]:
    old_len = int(scaling.get("original_max_position_embeddings") or max_seq_len)
    factor = scaling.get("factor")
    factor = float(factor) if factor else max_seq_len / old_len

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # the share of each frequency kept as is (extrapolated)
    base = theta ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * base)) * (1 - keep) + (1.0 / base) * keep
    return inv_freq, float(attention)


def rope_tables(
    rotary_dim: int, theta: float, scaling: dict[str, Any] | None, max_seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed-sin tables [max_seq_len, R]."""
    inv_freq, attention = inverse_frequencies(rotary_dim, theta, scaling, max_seq_len)
    t = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # [T, R/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, R]
    sin = freqs.sin() * attention
    return emb.cos() * attention, torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos, signed_sin [B, 1, T, R] from `rope_tables`; R ≤ D rotate."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        rotated = torch.roll(x, r // 2, dims=-1)
        return torch.addcmul(x * cos, rotated, signed_sin)
    part, rest = x.split([r, x.shape[-1] - r], dim=-1)
    rotated = torch.roll(part, r // 2, dims=-1)
    return torch.cat((torch.addcmul(part * cos, rotated, signed_sin), rest), dim=-1)
