"""The decoder-only Transformer: `ModelConfig` and every module, in forward order.

Two families from one config:

- `arch="llama"`: RoPE (configurable theta), RMSNorm, SwiGLU MLP, grouped-query attention, no
  biases, tied or untied embeddings (Llama, SmolLM2, Mistral-style checkpoints).
- `arch="gpt2"`: learned absolute positions, LayerNorm, GELU (tanh) MLP, biases everywhere,
  tied embeddings.

Parameter names follow Hugging Face's `LlamaForCausalLM` (`model.layers.N.self_attn.o_proj`, …)
except that Q/K/V and gate/up are fused (`qkv_proj`, `gate_up_proj`): at batch 1 the decoder
is bound by weight reads and one larger matmul reads faster than several small ones.
`checkpoint.py` splits and joins them.

Attention: `eager_attention` is the plain reference (softmax(QKᵀ/√d)V); `sdpa_attention` calls
`torch.nn.functional.scaled_dot_product_attention`. Both live in `ATTENTION` with one signature;
`Transformer.attn_impl` picks one.

KV cache: the caller allocates a cache (`KVCache`, contiguous rows, or a `PagedBatch` view of
the engine's block pool, both in `kv_cache.py`) and passes it in; `forward` stores the new keys
and values of the tokens at `positions` and attends over the cached prefix. `prefill` and
`decode_step` are the two hot paths, kept separate so each can be optimised on its own.

Shapes: B batch, T new tokens, Tk attended keys, H query heads, Hkv key/value heads, D head dim,
C d_model, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Self

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.kv_cache import KVCache, LayerCache, PagedBatch

Arch = Literal["llama", "gpt2"]


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
    """Shape and family of a decoder-only Transformer."""

    arch: Arch = "llama"
    """`llama` (RoPE, RMSNorm, SwiGLU, GQA) or `gpt2` (learned positions, LayerNorm, GELU)."""
    vocab_size: int = 32000
    d_model: int = 512
    n_layer: int = 8
    n_head: int = 8
    n_kv_head: int = 0
    """Key/value heads for grouped-query attention; 0 means `n_head` (multi-head attention)."""
    d_ff: int = 0
    """MLP hidden size; 0 means 4·d_model (gpt2) or ⌈8/3·d_model⌉ rounded up to 64 (llama)."""
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    dropout: float = 0.0
    head_dim: int = 0
    """Per-head size; 0 means d_model // n_head."""
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.arch not in ("llama", "gpt2"):
            raise ValueError(f"model.arch must be 'llama' or 'gpt2', got {self.arch!r}")
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
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
        if self.arch == "llama" and self.head_dim % 2:
            raise ValueError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
        if self.d_ff == 0:
            if self.arch == "gpt2":
                self.d_ff = 4 * self.d_model
            else:
                self.d_ff = 64 * math.ceil(8 * self.d_model / 3 / 64)
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.norm_eps) and self.norm_eps > 0):
            raise ValueError(f"model.norm_eps must be positive, got {self.norm_eps}")
        if self.arch == "gpt2" and self.n_kv_head != self.n_head:
            raise ValueError("model.n_kv_head must equal model.n_head for arch 'gpt2'")

    @property
    def bias(self) -> bool:
        return self.arch == "gpt2"

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        c, f, d = self.d_model, self.d_ff, self.head_dim
        attn = c * self.n_head * d * 2 + c * self.n_kv_head * d * 2
        mlp = c * f * (3 if self.arch == "llama" else 2)
        norms = 2 * c * (2 if self.arch == "gpt2" else 1)
        biases = (self.n_head * d * 2 + self.n_kv_head * d * 2 + f + c) if self.bias else 0
        per_layer = attn + mlp + norms + biases
        emb = self.vocab_size * c * (1 if self.tie_embeddings else 2)
        pos = self.max_seq_len * c if self.arch == "gpt2" else 0
        final_norm = c * (2 if self.arch == "gpt2" else 1)
        return self.n_layer * per_layer + emb + pos + final_norm


# ---------------------------------------------------------------------------------------------
# Norms and rotary embeddings


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in fp32 like the reference Llama implementation, then cast back.
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.arch == "gpt2":
        return nn.LayerNorm(config.d_model, eps=config.norm_eps)
    return RMSNorm(config.d_model, config.norm_eps)


def rope_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed-sin tables [max_seq_len, D] for HF Llama's rotate-half RoPE.

    rotate_half(x)·sin = cat(-x₂, x₁)·cat(s, s) = roll(x, D/2)·cat(-s, s), so the sign lives in
    the table and `apply_rope` needs one roll instead of two slices, a negation and a cat.
    """
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    t = torch.arange(config.max_seq_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    sin = freqs.sin()
    return emb.cos(), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos, signed_sin [B, 1, T, D] from `rope_tables`."""
    rotated = torch.roll(x, x.shape[-1] // 2, dims=-1)
    return torch.addcmul(x * cos, rotated, signed_sin)


# ---------------------------------------------------------------------------------------------
# Linear layers with a fast small-batch path

SPLIT_MAX_ROWS = 16
"""At most this many input rows (batch × new tokens) take the split path; more is a GEMM.

Up to 16 rows the split path still wins (fp32, 2 threads, µs, weights in the layout
`optimize_weight_layout` gives them): 3072×576 at 16 rows 604 vs 729 for `F.linear`, the
49152×576 LM head 17.4 ms vs 20.6 ms; at 32 rows the two are about even. A 16-row decode step
of the built-in model takes 90 ms instead of 111 ms."""


def weight_blocks(weight: torch.Tensor, parts: int) -> torch.Tensor:
    """weightᵀ [K, N] as `parts` column blocks [S, K, N/S], a view (no copy) of either layout:
    row-major weights are [N, K] contiguous, column-major ones the transpose of a [K, N]."""
    n, k = weight.shape
    if weight.is_contiguous():
        return weight.view(parts, n // parts, k).transpose(1, 2)
    return weight.t().view(k, parts, n // parts).transpose(0, 1)


def split_linear(x: torch.Tensor, blocks: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weightᵀ with the weight given as column blocks [S, K, N/S], in one `bmm`.

    At batch 1 a linear layer is a matrix-vector product bound by reading the weight; torch
    runs `F.linear` on one core there, while `bmm` gives each block to its own thread.
    """
    parts, k, n_part = blocks.shape
    rows = x.reshape(1, -1, k).expand(parts, -1, k)  # [S, M, K]
    y = torch.bmm(rows, blocks).transpose(0, 1).reshape(*x.shape[:-1], parts * n_part)
    return y if bias is None else y + bias


class Linear(nn.Linear):
    """`nn.Linear` plus the split small-batch path that `optimize_weight_layout` switches on."""

    blocks: torch.Tensor | None = None  # weight_blocks(weight) while the split path is on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.blocks
        if (
            blocks is not None
            and x.numel() <= SPLIT_MAX_ROWS * x.shape[-1]
            and blocks.data_ptr() == self.weight.data_ptr()  # not stale (weight replaced)
        ):
            return split_linear(x, blocks, self.bias)
        return F.linear(x, self.weight, self.bias)


# ---------------------------------------------------------------------------------------------
# Attention kernels: same signature, registered by name


AttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, bool, float], torch.Tensor
]


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> torch.Tensor:
    """Reference attention. q [B,H,T,D]; k, v [B,Hkv,Tk,D]; mask [B,1,T,Tk] bool (True = attend)."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    scores = (q @ k.transpose(-2, -1)).float() * scale  # [B, H, T, Tk]
    if is_causal:
        t, tk = scores.shape[-2:]
        mask = torch.ones(t, tk, dtype=torch.bool, device=q.device).tril(tk - t)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    return probs @ v  # [B, H, T, D]


BMM_MAX_LEN = 256
"""Causal training windows up to this long take `causal_bmm_attention` (see `sdpa_attention`)."""


def causal_bmm_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal softmax(QKᵀ·scale)V as two batched matmuls, for training on short windows.

    q, k, v [B, H, T, D] (same H) → [B, H, T, D]. The scores [B·H, T, T] are materialised, so
    this is for short T only. The softmax stays in the input dtype: torch's CPU kernel
    accumulates bf16 in fp32 anyway, and converting the scores to fp32 and back costs as much
    as the matmuls (16×6×256×64 bf16: 48.5 ms vs 30.6 ms per layer, same error against an fp32
    reference). The backward is plain autograd: four more bmm.
    """
    b, h, t, d = q.shape
    bias = torch.full((t, t), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
    scores = torch.baddbmm(  # [B·H, T, T]: scale and causal mask in the matmul's epilogue
        bias.expand(b * h, t, t),
        q.reshape(b * h, t, d),
        k.reshape(b * h, t, d).transpose(1, 2),
        alpha=scale,
    )
    probs = scores.softmax(dim=-1)
    return torch.bmm(probs, v.reshape(b * h, t, d)).view(b, h, t, d)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, except for causal training on short windows.

    There, SDPA's CPU flash kernel loses to two batched matmuls (attention forward + backward,
    one layer, 2 threads, torch 2.13, AMD EPYC, ms):

        B×H×T×D           dtype     flash    bmm
        12×4×64×32        fp32       1.43    0.85
        16×6×128×64       fp32      15.1    13.4
        16×6×256×64       fp32      45.4    54.0
        12×4×64×32        bf16       4.12    0.83
        16×6×256×64       bf16      57.1    27.4
        8×6×512×64        bf16      92.1    87.5

    so `causal_bmm_attention` takes windows up to 128 in fp32 and up to `BMM_MAX_LEN` in bf16
    when gradients flow; inference and evaluation keep SDPA (no T×T scores to store).
    """
    n_rep = q.shape[1] // k.shape[1]
    t = q.shape[2]
    if (
        is_causal
        and mask is None
        and q.requires_grad
        and t == k.shape[2]
        and t <= (128 if q.dtype == torch.float32 else BMM_MAX_LEN)
    ):
        if n_rep > 1:
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)
        return causal_bmm_attention(q, k, v, scale)
    if n_rep > 1 and not q.requires_grad:
        # Inference: let SDPA share each K/V head between its query heads instead of copying
        # the cache n_rep times (decode, 90 cached tokens: 20 µs vs 47 µs per layer; batched
        # decode with per-row masks, 16 rows × 500 tokens: 0.6 ms vs 13 ms).
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True
        )
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


ATTENTION: dict[str, AttentionFn] = {"eager": eager_attention, "sdpa": sdpa_attention}


@dataclass
class AttentionPlan:
    """What every layer needs to know about one forward call, computed once."""

    positions: torch.Tensor  # [B, T] int64
    write_start: int | None  # contiguous cache: slice write at [start, start+T) for every row
    k_len: int  # keys attended: cache prefix [0, k_len)
    mask: torch.Tensor | None  # [B, 1, T, Tk] bool, True = attend
    is_causal: bool


def plan_attention(
    positions: torch.Tensor | None,
    batch: int,
    t: int,
    kv_cache: KVCache | PagedBatch | None,
    device: torch.device | None = None,
) -> AttentionPlan:
    if positions is None:
        if isinstance(kv_cache, PagedBatch):
            raise ValueError("a paged KV cache needs explicit positions")
        # Every row holds tokens 0..T-1: plain causal attention, slice writes.
        pos = torch.arange(t, device=device).unsqueeze(0).expand(batch, t)
        return AttentionPlan(pos, write_start=0, k_len=t, mask=None, is_causal=t > 1)
    if positions.dim() == 1:
        positions = positions.unsqueeze(0).expand(batch, t)
    device = positions.device
    if isinstance(kv_cache, PagedBatch):
        # Each row's blocks gathered in order: key j is at position j; a query sees the keys
        # up to its own position (the rest of the row's blocks is stale or the null block).
        keys = torch.arange(kv_cache.k_len, device=device)
        mask = (keys[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # [B, 1, T, Tk]
        return AttentionPlan(positions, None, kv_cache.k_len, mask=mask, is_causal=False)
    k_len = int(positions.max()) + 1
    if kv_cache is None:
        if k_len != t:
            raise ValueError("positions without a kv_cache must be 0..T-1")
        return AttentionPlan(positions, write_start=0, k_len=t, mask=None, is_causal=t > 1)
    if k_len > kv_cache.max_len:
        raise ValueError(f"position {k_len - 1} is beyond the KV cache ({kv_cache.max_len})")
    first = positions[:, :1]
    same_rows = batch == 1 or bool((positions == positions[:1]).all())
    contiguous = t == 1 or bool((positions == first + torch.arange(t, device=device)).all())
    write_start = int(first[0, 0]) if same_rows and contiguous else None
    if same_rows and contiguous and t == 1:
        # One new token per row, all at the same position: it sees the whole prefix.
        return AttentionPlan(positions, write_start, k_len, mask=None, is_causal=False)
    if same_rows and contiguous and write_start == 0:
        return AttentionPlan(positions, write_start, k_len, mask=None, is_causal=t > 1)
    keys = torch.arange(k_len, device=device)
    mask = (keys[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # [B, 1, T, Tk]
    return AttentionPlan(positions, write_start, k_len, mask=mask, is_causal=False)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(config.head_dim)
        qd, kvd = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        # Q, K and V in one matmul: one weight read per token instead of three.
        self.qkv_proj = Linear(config.d_model, qd + 2 * kvd, bias=config.bias)
        self.o_proj = Linear(qd, config.d_model, bias=config.bias)
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,  # [B, T, C]
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        plan: AttentionPlan,
        cache: LayerCache | None,
        attn_fn: AttentionFn,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        h, hkv = self.n_head, self.n_kv_head
        qkv = self.qkv_proj(x).view(b, t, h + 2 * hkv, self.head_dim).transpose(1, 2)
        # `split`, not slicing: its backward is one cat, where each slice's backward zero-fills
        # a gradient of the whole and copies into it.
        qk, v = qkv.split([h + hkv, hkv], dim=1)  # [B, H + Hkv, T, D]: one RoPE call for both
        if rope is not None:
            qk = apply_rope(qk, *rope)
        q, k = qk.split([h, hkv], dim=1)  # [B, H, T, D], [B, Hkv, T, D]
        if cache is not None:  # store the new keys and values, attend over the cached ones
            k, v = cache.update(k, v, plan)  # [B, Hkv, Tk, D]
        y = attn_fn(q, k, v, plan.mask, plan.is_causal, self.scale)  # [B, H, T, D]
        y = y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim)
        y = self.o_proj(y)
        # Functional dropout, skipped at p = 0: a module call per layer costs ~5 µs at decode.
        return F.dropout(y, self.dropout, self.training) if self.dropout else y


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gated = config.arch == "llama"
        if self.gated:  # gate and up in one matmul
            self.gate_up_proj = Linear(config.d_model, 2 * config.d_ff, bias=False)
        else:
            self.up_proj = Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down_proj = Linear(config.d_ff, config.d_model, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")
        y = self.down_proj(h)
        return F.dropout(y, self.dropout, self.training) if self.dropout else y


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        plan: AttentionPlan,
        cache: LayerCache | None,
        attn_fn: AttentionFn,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, plan, cache, attn_fn)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings, blocks and the final norm (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        if config.arch == "gpt2":
            self.embed_positions = nn.Embedding(config.max_seq_len, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, attn_impl: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.attn_impl = attn_impl
        self.model = Backbone(config)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if config.arch == "llama":
            self.register_buffer("rope_cos", torch.empty(0), persistent=False)
            self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        if not any(p.is_meta for p in self.parameters()):
            self.init_buffers()
            self.reset_parameters()

    def init_buffers(self) -> None:
        """(Re)compute the RoPE tables; needed after building on the meta device."""
        if self.config.arch == "llama":
            cos, sin = rope_tables(self.config)
            device = self.model.embed_tokens.weight.device
            self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    @property
    def attn_impl(self) -> str:
        return self._attn_impl

    @attn_impl.setter
    def attn_impl(self, name: str) -> None:
        if name not in ATTENTION:
            raise ValueError(f"unknown attention '{name}', choose from {sorted(ATTENTION)}")
        self._attn_impl = name

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual projections scaled by 1/√(2·n_layer)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    def hidden_states(
        self,
        ids: torch.Tensor,  # [B, T]
        positions: torch.Tensor | None = None,  # [B, T] or [T]; None = 0..T-1
        kv_cache: KVCache | PagedBatch | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, T, C]."""
        cfg = self.config
        b, t = ids.shape
        plan = plan_attention(positions, b, t, kv_cache, ids.device)
        if plan.k_len > cfg.max_seq_len:
            raise ValueError(f"position {plan.k_len - 1} is beyond the context {cfg.max_seq_len}")
        x = self.model.embed_tokens(ids)  # [B, T, C]
        rope = None
        if cfg.arch == "gpt2":
            x = x + self.model.embed_positions(plan.positions)
        else:
            cos = self.rope_cos[plan.positions].unsqueeze(1)  # [B, 1, T, D]
            sin = self.rope_sin[plan.positions].unsqueeze(1)
            rope = (cos.to(x.dtype), sin.to(x.dtype))
        if cfg.dropout:
            x = F.dropout(x, cfg.dropout, self.training)
        attn_fn = ATTENTION[self._attn_impl]
        for i, layer in enumerate(self.model.layers):
            x = layer(x, rope, plan, kv_cache.layer(i) if kv_cache is not None else None, attn_fn)
        return self.model.norm(x)

    def forward(
        self,
        ids: torch.Tensor,  # [B, T]
        positions: torch.Tensor | None = None,
        kv_cache: KVCache | PagedBatch | None = None,
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, V] (or [B, 1, V] with `last_only`)."""
        h = self.hidden_states(ids, positions, kv_cache)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)


# ---------------------------------------------------------------------------------------------
# The two inference hot paths


@torch.inference_mode()
def prefill(
    model: Transformer, ids: torch.Tensor, kv_cache: KVCache, start: int = 0
) -> torch.Tensor:
    """Run prompt tokens ids [B, T] at positions start..start+T-1; logits of the last one [B, V]."""
    positions = None
    if start:
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
    return model(ids, positions, kv_cache, last_only=True)[:, -1]


@torch.inference_mode()
def decode_step(
    model: Transformer, ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache
) -> torch.Tensor:
    """One new token per row: ids [B], positions [B] → logits [B, V]."""
    return model(ids.unsqueeze(1), positions.unsqueeze(1), kv_cache)[:, -1]


def optimize_weight_layout(model: nn.Module, parts: int = 2) -> None:
    """Store each weight in its faster layout for small batches and switch on `split_linear`.

    Measured on this machine kind (torch 2.13, 2 threads, batch 1, µs per matmul):

        weight [N, K]    F.linear row   F.linear col   split row   split col
        960 × 576             213            149           148         134
        576 × 576             127            121            83          91
        3072 × 576            728            416           415         286
        576 × 1536            285            362           162         217
        49152 × 576         11018           5779          5343        2655

    So: wide weights (N > K: QKV, gate/up, the LM head) go column-major, the rest stay
    row-major, and every one with an even N uses the split path (2 blocks: more did not help).
    For bfloat16 weights the plain row-major `F.linear` is fastest for every shape above (the
    split path is up to 6× slower there), so they are left row-major without it. Values are
    unchanged; results match the plain layout to float rounding. Call it on a model used for
    inference, not for training.
    """
    seen: set[int] = set()
    for module in model.modules():
        if not isinstance(module, Linear) or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        w = module.weight
        n, k = w.shape
        column_major = w.dtype == torch.float32 and n > k
        if column_major and w.is_contiguous():
            w.data = w.data.t().contiguous().t()
        elif not column_major and not w.is_contiguous():
            w.data = w.data.contiguous()
    # Every Linear, including those whose (tied) weight the loop above skipped as seen.
    for module in model.modules():
        if isinstance(module, Linear):
            w = module.weight
            split = w.dtype == torch.float32 and w.shape[0] % parts == 0
            module.blocks = weight_blocks(w.detach(), parts) if split else None
