"""The decoder-only Transformer: every module, in forward order, for every family.

One model, driven by the explicit features of `ModelConfig` (`config.py`): norm kind and
placement, gated or plain MLP and its activation, biases, QK-norm, per-layer attention kind
(full, sliding window, no RoPE), RoPE θ per layer kind with scaling and partial rotary (`rope.py`),
learned absolute positions, embedding scale, and tanh soft-capping of attention scores and of the
logits. No family name is read here.

Parameter names follow Hugging Face's `LlamaForCausalLM` (`model.layers.N.self_attn.o_proj`, …)
except that Q/K/V and gate/up are fused (`qkv_proj`, `gate_up_proj`: at batch 1 the decoder is
bound by weight reads and one larger matmul reads faster than several small ones), and the
norms are named by where they sit: `input_layernorm` (before attention),
`post_attention_layernorm` (before the MLP, Llama's meaning), `attn_output_norm` and
`mlp_output_norm` (on the attention and MLP outputs: Gemma's sandwich, OLMo 2's post-norm),
`self_attn.q_norm` / `k_norm`. `formats/families.py` maps each family's names onto these.

Attention: `eager_attention` is the plain reference (softmax(QKᵀ·scale)V); `sdpa_attention` calls
`torch.nn.functional.scaled_dot_product_attention`. Both live in `ATTENTION` with one signature;
`Transformer.attn_impl` picks one. Soft-capped layers take `eager_attention` with its cap.

KV cache: the caller allocates a cache (`KVCache`, contiguous rows, or a `PagedBatch` view of
the engine's block pool, both in `kv_cache.py`) and passes it in; `forward` stores the new keys
and values of the tokens at `positions` and attends over the cached prefix. `prefill` and
`decode_step` are the two hot paths, kept separate so each can be optimised on its own.

Shapes: B batch, T new tokens, Tk attended keys, H query heads, Hkv key/value heads, D head dim,
R rotary dims, C d_model, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ConfigDict, ModelConfig
from lmforge.model.kv_cache import KVCache, LayerCache, PagedBatch
from lmforge.model.rope import apply_rope, rope_tables

__all__ = ["ConfigDict", "ModelConfig", "Transformer", "optimize_weight_layout"]


# ---------------------------------------------------------------------------------------------
# Norms and activations


class RMSNorm(nn.Module):
    """x / rms(x) · (w + offset): offset 0 for Llama's norm, 1 for Gemma's (weights start at 0)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.ones(dim) if not offset else torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight + self.offset if self.offset else self.weight
        if x.dtype == torch.float32 and w.dtype == torch.float32:
            return F.rms_norm(x, w.shape, w, self.eps)
        # Normalise in fp32 like the reference implementations, then cast back.
        return F.rms_norm(x.float(), w.shape, w.float(), self.eps).to(x.dtype)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.d_model
    if config.norm == "layer":
        return nn.LayerNorm(dim, eps=config.norm_eps)
    return RMSNorm(dim, config.norm_eps, 1.0 if config.norm == "rms_offset" else 0.0)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap · tanh(x / cap): bounded scores or logits (Gemma 2)."""
    return torch.tanh(x / cap) * cap


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
    cap: float = 0.0,
) -> torch.Tensor:
    """Reference attention. q [B,H,T,D]; k, v [B,Hkv,Tk,D]; mask [B,1,T,Tk] bool (True = attend).

    CAP > 0 soft-caps the scores (cap·tanh(s/cap)) before the mask (Gemma 2); SDPA cannot, so
    soft-capped layers always take this path.
    """
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    scores = (q @ k.transpose(-2, -1)).float() * scale  # [B, H, T, Tk]
    if cap:
        scores = softcap(scores, cap)
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
    k_len: int  # keys attended: cache prefix [0, k_len); key j holds position j
    mask: torch.Tensor | None  # [B, 1, T, Tk] bool, True = attend
    is_causal: bool
    windowed: dict[int, tuple[torch.Tensor | None, bool]] = field(default_factory=dict)

    def for_window(self, window: int) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for a layer that sees only the last WINDOW positions (0: all).

        A query at position p sees keys p − window < j ≤ p, as Hugging Face's sliding-window
        masks do. Computed once per window size and forward call.
        """
        if window <= 0 or self.k_len <= window:  # no query is far enough to lose a key
            return self.mask, self.is_causal
        if window not in self.windowed:
            keys = torch.arange(self.k_len, device=self.positions.device)
            pos = self.positions[:, :, None]
            near = (keys[None, None, :] > pos - window) & (keys[None, None, :] <= pos)
            mask = near.unsqueeze(1)  # [B, 1, T, Tk]
            if self.mask is not None:
                mask = mask & self.mask
            self.windowed[window] = (mask, False)
        return self.windowed[window]


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
    def __init__(self, config: ModelConfig, layer_type: str = "full") -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.scale = config.attn_scale
        self.window = config.sliding_window if layer_type == "sliding" else 0
        self.softcap = config.attn_softcap
        qd, kvd = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        # Q, K and V in one matmul: one weight read per token instead of three.
        self.qkv_proj = Linear(config.d_model, qd + 2 * kvd, bias=bool(config.qkv_bias))
        self.o_proj = Linear(qd, config.d_model, bias=bool(config.o_bias))
        self.qk_norm = config.qk_norm
        if config.qk_norm == "head":  # one norm over each head's D dims (Qwen3, Gemma 3)
            self.q_norm, self.k_norm = (
                make_norm(config, config.head_dim),
                make_norm(config, config.head_dim),
            )
        elif config.qk_norm == "full":  # over all heads' dims at once (OLMo 2)
            self.q_norm, self.k_norm = make_norm(config, qd), make_norm(config, kvd)
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
        h, hkv, d = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv_proj(x)  # [B, T, (H + 2·Hkv)·D]
        if self.qk_norm == "full":
            q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
            qkv = torch.cat((self.q_norm(q), self.k_norm(k), v), dim=-1)
        heads = qkv.view(b, t, h + 2 * hkv, d)
        if self.qk_norm == "head":
            q, k, v = heads.split([h, hkv, hkv], dim=2)
            heads = torch.cat((self.q_norm(q), self.k_norm(k), v), dim=2)
        # `split`, not slicing: its backward is one cat, where each slice's backward zero-fills
        # a gradient of the whole and copies into it.
        qk, v = heads.transpose(1, 2).split([h + hkv, hkv], dim=1)  # one RoPE call for Q and K
        if rope is not None:
            qk = apply_rope(qk, *rope)
        q, k = qk.split([h, hkv], dim=1)  # [B, H, T, D], [B, Hkv, T, D]
        if cache is not None:  # store the new keys and values, attend over the cached ones
            k, v = cache.update(k, v, plan)  # [B, Hkv, Tk, D]
        mask, is_causal = plan.for_window(self.window)
        if self.softcap:
            y = eager_attention(q, k, v, mask, is_causal, self.scale, self.softcap)
        else:
            y = attn_fn(q, k, v, mask, is_causal, self.scale)  # [B, H, T, D]
        y = y.transpose(1, 2).reshape(b, t, h * d)
        y = self.o_proj(y)
        # Functional dropout, skipped at p = 0: a module call per layer costs ~5 µs at decode.
        return F.dropout(y, self.dropout, self.training) if self.dropout else y


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gated = config.mlp == "gated"
        self.act = ACTIVATIONS[str(config.activation)]
        if self.gated:  # gate and up in one matmul
            self.gate_up_proj = Linear(config.d_model, 2 * config.d_ff, bias=bool(config.mlp_bias))
        else:
            self.up_proj = Linear(config.d_model, config.d_ff, bias=bool(config.mlp_bias))
        self.down_proj = Linear(config.d_ff, config.d_model, bias=bool(config.mlp_bias))
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(self.up_proj(x))
        y = self.down_proj(h)
        return F.dropout(y, self.dropout, self.training) if self.dropout else y


class Block(nn.Module):
    """One layer; its norms by `norm_placement`: pre (Llama), sandwich (Gemma), post (OLMo 2)."""

    def __init__(self, config: ModelConfig, layer_type: str = "full") -> None:
        super().__init__()
        self.layer_type = layer_type
        self.pre = config.norm_placement != "post"
        self.post = config.norm_placement != "pre"
        # Registered in Llama's order (state dicts and seeded initialisations keep theirs).
        if self.pre:
            self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config, layer_type)
        if self.pre:
            self.post_attention_layernorm = make_norm(config)  # before the MLP (Llama's name)
        self.mlp = MLP(config)
        if self.post:
            self.attn_output_norm = make_norm(config)
            self.mlp_output_norm = make_norm(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        plan: AttentionPlan,
        cache: LayerCache | None,
        attn_fn: AttentionFn,
    ) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x) if self.pre else x, rope, plan, cache, attn_fn)
        x = x + (self.attn_output_norm(h) if self.post else h)
        h = self.mlp(self.post_attention_layernorm(x) if self.pre else x)
        return x + (self.mlp_output_norm(h) if self.post else h)


class Backbone(nn.Module):
    """Embeddings, blocks and the final norm (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        if config.positions == "learned":
            self.embed_positions = nn.Embedding(config.max_seq_len, config.d_model)
        assert config.layer_types is not None
        self.layers = nn.ModuleList(Block(config, kind) for kind in config.layer_types)
        self.norm = make_norm(config)


ROPE_TABLE_LEN = 4096
"""RoPE tables start this long (or the context, if shorter) and double when a position needs
it: a 32k-context model with 256-dim heads would otherwise keep 128 MB of tables."""


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, attn_impl: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.attn_impl = attn_impl
        self.model = Backbone(config)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # RoPE tables: "global" for full layers, "local" for sliding ones with their own θ.
        self.rope_kinds = self._rope_kinds(config)
        for kind in set(self.rope_kinds.values()) - {None}:
            self.register_buffer(f"rope_cos_{kind}", torch.empty(0), persistent=False)
            self.register_buffer(f"rope_sin_{kind}", torch.empty(0), persistent=False)
        if not any(p.is_meta for p in self.parameters()):
            self.init_buffers()
            self.reset_parameters()

    @staticmethod
    def _rope_kinds(config: ModelConfig) -> dict[str, str | None]:
        """Layer type → which RoPE table it uses (None: no RoPE)."""
        if config.positions != "rope":
            return dict.fromkeys(("full", "sliding", "nope"))
        local = "local" if config.rope_theta_local else "global"
        return {"full": "global", "sliding": local, "nope": None}

    def init_buffers(self, length: int = 0) -> None:
        """(Re)compute the RoPE tables (at least LENGTH positions); needed after building on the
        meta device, and done again when a position goes past the tables."""
        c = self.config
        length = min(c.max_seq_len, max(length, ROPE_TABLE_LEN))
        device = self.model.embed_tokens.weight.device
        assert c.rope_theta is not None
        thetas = {"global": (c.rope_theta, c.rope_scaling), "local": (c.rope_theta_local, None)}
        # Never inference tensors, even when first needed under inference_mode: training
        # afterwards would have to save them for backward.
        with torch.inference_mode(False), torch.no_grad():
            for kind in set(self.rope_kinds.values()) - {None}:
                theta, scaling = thetas[str(kind)]
                cos, sin = rope_tables(c.rotary_dim, float(theta or 0), scaling, length)
                setattr(self, f"rope_cos_{kind}", cos.to(device))
                setattr(self, f"rope_sin_{kind}", sin.to(device))

    def _ropes(
        self, positions: torch.Tensor, k_len: int, dtype: torch.dtype
    ) -> dict[str | None, tuple[torch.Tensor, torch.Tensor] | None]:
        """cos/sin [B, 1, T, R] at POSITIONS, per table."""
        kinds = set(self.rope_kinds.values()) - {None}
        out: dict[str | None, tuple[torch.Tensor, torch.Tensor] | None] = {None: None}
        if kinds and getattr(self, f"rope_cos_{next(iter(kinds))}").shape[0] < k_len:
            self.init_buffers(max(2 * k_len, ROPE_TABLE_LEN))
        for kind in kinds:
            cos = getattr(self, f"rope_cos_{kind}")[positions].unsqueeze(1)
            sin = getattr(self, f"rope_sin_{kind}")[positions].unsqueeze(1)
            out[kind] = (cos.to(dtype), sin.to(dtype))
        return out

    @property
    def attn_impl(self) -> str:
        return self._attn_impl

    @attn_impl.setter
    def attn_impl(self, name: str) -> None:
        if name not in ATTENTION:
            raise ValueError(f"unknown attention '{name}', choose from {sorted(ATTENTION)}")
        self._attn_impl = name

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual projections scaled by 1/√(2·n_layer); norms
        start as the identity (weight 1, or 0 for Gemma's 1 + w)."""
        std = self.config.init_std
        norms = {id(m.weight): m for m in self.modules() if isinstance(m, (RMSNorm, nn.LayerNorm))}
        for name, p in self.named_parameters():
            norm = norms.get(id(p))
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif norm is not None:
                nn.init.constant_(p, 0.0 if getattr(norm, "offset", 0.0) else 1.0)
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
        if cfg.embed_scale != 1.0:  # Gemma: √C, rounded to the activations' dtype as HF does
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        if cfg.positions == "learned":
            x = x + self.model.embed_positions(plan.positions)
        ropes = self._ropes(plan.positions, plan.k_len, x.dtype)
        if cfg.dropout:
            x = F.dropout(x, cfg.dropout, self.training)
        attn_fn = ATTENTION[self._attn_impl]
        for i, layer in enumerate(self.model.layers):
            rope = ropes[self.rope_kinds[str(layer.layer_type)]]
            x = layer(x, rope, plan, kv_cache.layer(i) if kv_cache is not None else None, attn_fn)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on final hidden states [..., C] → [..., V], soft-capped if configured."""
        out = self.lm_head(hidden)
        cap = self.config.final_softcap
        return softcap(out, cap) if cap else out

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
        return self.logits(h)


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
