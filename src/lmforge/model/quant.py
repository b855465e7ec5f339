"""Weight-only int8 and int4 quantization of the decoder's linear layers and the LM head.

What is quantized: every `Linear` of the blocks (`qkv_proj`, `o_proj`, `gate_up_proj` or
`up_proj`, `down_proj`) with the chosen method, and the LM head with `head` (int8 by default,
as llama.cpp keeps its output matrix at 8 bits or more: on the built-in model an int4 head
costs +4.8% perplexity, an int8 one +0.05%). The embedding lookup, the norms and the biases
stay float. When the head is tied to the embeddings (the built-in model: 49152 × 576), the
quantized head is a copy of its own and the embedding keeps the float table: at batch-1 decode
the head is about a fifth of all weight reads, so leaving it float would keep the slowest matmul
of the step in fp32.

Two methods, both with fp32 (or bf16) activations:

- `int8`: symmetric, one scale per output channel (row): w ≈ q · scale, q ∈ [-127, 127].
  Runs on `torch._weight_int8pack_mm`, which takes per-channel scales only, so int8 has no
  group size. Its bf16 path is about 15× faster than its fp32 one here (a 3072 × 576 layer at
  one row: 25 µs vs 636 µs), so it also runs in bf16, with unit scales: the fp32 scales are
  applied to its output, exactly.
- `int4`: asymmetric uint4 with a float zero point per group of `group_size` inputs, the
  layout of gpt-fast and torchao: w ≈ (q − 8) · scale + zero, q ∈ [0, 15], scale = (max −
  min) / 15, zero = min + 8 · scale. Runs on `torch._weight_int4pack_mm_for_cpu`, which wants
  N % 16 == 0 and a group size of 32, 64, 128 or 256 dividing K. On x86 that kernel is
  vectorized (AVX2/AVX-512) for bf16 only; with fp32 it falls back to a scalar loop about 20×
  slower. So int4 layers run the kernel in bf16 whatever the model's dtype: the activations,
  scales and zeros are rounded to bf16 (8 significant bits) going in, the sums accumulate in
  fp32, and the result comes back as bf16 cast to the model's dtype.

What a module keeps (and `model/formats` saves) is portable plain tensors: `qweight` (int8
[N, K], or uint8 [N, K/2] holding two int4 values per byte, the even column in the low nibble),
`scales` (fp32 [N] or [N, K/group]) and `zeros` (int4: fp32 [N, K/group]). The CPU kernel's
packed int4 layout is an implementation detail of torch, so `Int4Linear` converts to it when
its tensors are set (`pack`), and keeps that copy beside the portable one (int4 weights twice
in memory: still about a quarter of the fp32 layer).

The kernels compute one input row at a time (their cost grows linearly with the rows), so a
call with more than `KERNEL_MAX_ROWS` rows (a long prefill, a perplexity window) dequantizes
the weight once and runs a float GEMM instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model.lora import LoraLinear
from lmforge.model.transformer import Transformer

Method = Literal["int8", "int4"]
METHODS: tuple[str, ...] = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what `_weight_int4pack_mm_for_cpu` accepts
DEFAULT_INT4_GROUP_SIZE = 32
"""Perplexity of the built-in model on tinyshakespeare's last 10% (35,770 tokens, int8 head):
fp32 34.750, group 32 34.791 (+0.12%), group 64 44.892 (+29%): its weights came from a Q4_1
file with groups of 32, which group 32 reproduces and group 64 cannot. Group 128 does not
divide its d_model (576)."""

KERNEL_DTYPE = torch.bfloat16
"""What the int4 kernel computes in (its only vectorized dtype on x86; see the module notes)."""

KERNEL_MAX_ROWS = 16
"""Calls with at most this many input rows (batch × new tokens) take the int8/int4 kernel;
more rows dequantize the weight and run `F.linear` (the kernels' cost is per row)."""


HEAD_METHODS: tuple[str, ...] = ("int8", "int4", "float")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model: the blocks' method, int4 group size, and the LM head's method."""

    method: str = "int4"
    """`int8` (per output channel) or `int4` (per group, asymmetric)."""
    group_size: int | None = None
    """int4: inputs per scale/zero group (32, 64, 128 or 256; None = 32). int8: must be None."""
    head: str = "int8"
    """The LM head: `int8`, `int4` (with the int4 method only) or `float` (left as it is)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LmforgeError(f"unknown quantization method {self.method!r}; choose int8 or int4")
        if self.head not in HEAD_METHODS:
            raise LmforgeError(f"unknown head method {self.head!r}; choose int8, int4 or float")
        if self.method == "int8":
            if self.group_size is not None:
                raise LmforgeError(
                    "int8 quantization is per output channel; --group-size applies to int4"
                )
            if self.head == "int4":
                raise LmforgeError("an int4 head needs --method int4 (its group size)")
            return
        if self.group_size is None:
            object.__setattr__(self, "group_size", DEFAULT_INT4_GROUP_SIZE)
        elif self.group_size not in INT4_GROUP_SIZES:
            sizes = ", ".join(map(str, INT4_GROUP_SIZES))
            raise LmforgeError(f"int4 group size must be one of {sizes}, not {self.group_size}")

    @property
    def bits(self) -> int:
        return 8 if self.method == "int8" else 4

    def method_of(self, name: str) -> str:
        """The method layer NAME (a module path) is quantized with: the head's or the blocks'."""
        return self.head if name == "lm_head" else self.method

    def check_layer(self, name: str, in_features: int, out_features: int) -> None:
        """Raise a one-line LmforgeError if layer NAME [out, in] cannot take this config."""
        if self.method_of(name) != "int4":
            return
        group = self.group_size
        assert group is not None
        if in_features % group:
            fits = [str(g) for g in INT4_GROUP_SIZES if in_features % g == 0]
            hint = f" (use --group-size {' or '.join(fits)})" if fits else ""
            raise LmforgeError(
                f"int4 group size {group} does not divide {name}'s in_features ({in_features})"
                + hint
            )
        if out_features % 16:
            raise LmforgeError(
                f"int4 needs out_features divisible by 16; {name} has {out_features}"
            )


# ---------------------------------------------------------------------------------------------
# Pure functions: float weight [N, K] ↔ quantized tensors


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] → (qweight int8 [N, K], scales fp32 [N]); w ≈ qweight · scales[:, None]."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)  # [N]
    scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 weight [N, K] that int8 QWEIGHT [N, K] and SCALES [N] stand for."""
    return qweight.float() * scales.float()[:, None]


def quantize_int4(
    w: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] → (qweight uint8 [N, K/2], scales fp32 [N, G], zeros fp32 [N, G]), G = K/group.

    Per group of GROUP_SIZE inputs: q = round((w − min) / scale) ∈ [0, 15] with scale = (max −
    min) / 15 and zero = min + 8 · scale, so w ≈ (q − 8) · scale + zero to within scale / 2.
    """
    n, k = w.shape
    if k % group_size or k % 2:
        raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
    g = w.detach().float().reshape(n, k // group_size, group_size)  # [N, G, group]
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # [N, G]
    scales = (hi - lo) / 15
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # a constant group: q = 0
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp_(0, 15).to(torch.uint8)
    return pack_uint4(q.reshape(n, k)), scales, lo + 8 * scales


def dequantize_int4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> torch.Tensor:
    """The fp32 weight [N, K] that QWEIGHT uint8 [N, K/2], SCALES and ZEROS [N, G] stand for."""
    q = unpack_uint4(qweight)  # [N, K] uint8
    n, k = q.shape
    groups = scales.shape[1]
    s, z = scales.float()[..., None], zeros.float()[..., None]  # [N, G, 1]
    w = torch.addcmul(z - 8 * s, q.view(n, groups, k // groups).float(), s)
    return w.view(n, k)


def pack_uint4(q: torch.Tensor) -> torch.Tensor:
    """Values 0..15 [N, K] → uint8 [N, K/2]: column 2j in the low nibble, 2j + 1 in the high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_uint4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] from `pack_uint4` → uint8 values 0..15 [N, K]."""
    n = packed.shape[0]
    return torch.stack((packed & 15, packed >> 4), dim=-1).view(n, -1)


def pack_int4_for_cpu(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Portable int4 tensors → (packed weight, scales_and_zeros [G, N, 2]) for
    `torch._weight_int4pack_mm_for_cpu`; the scales and zeros keep their dtype."""
    q = unpack_uint4(qweight).to(torch.int32)  # [N, K]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # inner k-tiles: CPU ignores
    scales_and_zeros = torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous()
    return packed, scales_and_zeros


# ---------------------------------------------------------------------------------------------
# Modules


class QuantLinear(nn.Module):
    """What Int8Linear and Int4Linear share: shape, the optional float bias, and the
    large-batch fallback."""

    method: str = ""

    def __init__(self, in_features: int, out_features: int, bias: bool, device: Any) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(
                torch.zeros(out_features, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    def dequantize(self) -> torch.Tensor:
        """The float weight [N, K] this layer computes with (fp32)."""
        raise NotImplementedError

    def kernel(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [M, K] (contiguous) → [M, N] through the weight-only kernel."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if x2.shape[0] <= KERNEL_MAX_ROWS:
            y = self.kernel(x2.contiguous())
        else:
            y = F.linear(x2, self.dequantize().to(x.dtype))
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


class Int8Linear(QuantLinear):
    """y = x · (qweight · scales)ᵀ + bias, with int8 weights and one scale per output row."""

    method = "int8"
    qweight: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # [N]

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, device: Any = None
    ) -> None:
        super().__init__(in_features, out_features, bias, device)
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scales", torch.ones(out_features, device=device))
        # The kernel's scale argument: ones, built once here rather than on every call (a plain
        # attribute, so `.to(dtype)` and loading leave it as the kernel wants it).
        self._unit_scales = torch.ones(out_features, dtype=KERNEL_DTYPE)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        module.qweight, module.scales = quantize_int8(linear.weight)
        if linear.bias is not None and module.bias is not None:
            module.bias.data = linear.bias.detach().float().clone()
        return module

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales)

    def kernel(self, x2: torch.Tensor) -> torch.Tensor:
        # bf16 in (the fast kernel), unit scales, then the exact fp32 scales on the way out.
        y = torch._weight_int8pack_mm(x2.to(KERNEL_DTYPE), self.qweight, self._unit_scales)
        return y.to(x2.dtype) * self.scales.to(x2.dtype)


class Int4Linear(QuantLinear):
    """y = x · Wᵀ + bias with W = (q − 8) · scale + zero per group of `group_size` inputs."""

    method = "int4"
    qweight: torch.Tensor  # uint8 [N, K/2], two values per byte
    scales: torch.Tensor  # [N, G]
    zeros: torch.Tensor  # [N, G]
    packed: torch.Tensor  # the kernel's layout of qweight

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        group_size: int = DEFAULT_INT4_GROUP_SIZE,
        device: Any = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device)
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer(
            "qweight",
            torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device),
        )
        self.register_buffer("scales", torch.ones(out_features, groups, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, device=device))
        # The kernel's own layout, rebuilt by `pack` from the three tensors above. Its scales
        # and zeros [G, N, 2] are a plain attribute, not a buffer, so that casting the model
        # (`.to(dtype)`) leaves them in KERNEL_DTYPE and the hot path needs no cast per call.
        self.register_buffer("packed", torch.empty(0, dtype=torch.uint8), persistent=False)
        self.scales_and_zeros = torch.empty(0, dtype=KERNEL_DTYPE)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        module.qweight, module.scales, module.zeros = quantize_int4(linear.weight, group_size)
        if linear.bias is not None and module.bias is not None:
            module.bias.data = linear.bias.detach().float().clone()
        module.pack()
        return module

    def pack(self) -> None:
        """Convert the portable tensors to the kernel's layout (after they were set)."""
        if self.qweight.is_meta:
            return
        packed, scales_and_zeros = pack_int4_for_cpu(self.qweight, self.scales, self.zeros)
        self.packed, self.scales_and_zeros = packed, scales_and_zeros.to(KERNEL_DTYPE)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.pack()

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.scales, self.zeros)

    def kernel(self, x2: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(
            x2.to(KERNEL_DTYPE), self.packed, self.group_size, self.scales_and_zeros
        )
        return y.to(x2.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


# ---------------------------------------------------------------------------------------------
# Whole models


def quant_targets(model: Transformer, include_head: bool) -> list[tuple[str, nn.Linear]]:
    """(module path, layer) of every linear layer quantization replaces, in forward order."""
    out = [
        (f"model.{name}", module)
        for name, module in model.model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    if include_head and isinstance(model.lm_head, nn.Linear):
        out.append(("lm_head", model.lm_head))
    return out


def quantize_model(model: Transformer, config: QuantConfig) -> list[str]:
    """Swap MODEL's linear layers for Int8Linear / Int4Linear in place; their module paths.

    A model on the meta device (`formats.empty_model`) gets empty quantized layers of the
    right shapes, for loading a saved quantized model into. Refused (LmforgeError, one line)
    for anything but a plain Transformer language model: an LSTM, a task-head model, a model
    with LoRA adapters, or one that is already quantized; and for a layer whose shape the
    method cannot take (named in the message)."""
    if not isinstance(model, Transformer):
        raise LmforgeError(
            f"only Transformer language models can be quantized, not {type(model).__name__}"
        )
    if is_quantized(model):
        raise LmforgeError("the model is already quantized")
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise LmforgeError("the model has LoRA adapters: merge them first (lmforge models merge)")
    targets = quant_targets(model, config.head != "float")
    for name, linear in targets:
        config.check_layer(name, linear.in_features, linear.out_features)
    done = []
    for name, linear in targets:
        new = _quantized(linear, config.method_of(name), config.group_size)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
        done.append(name)
    # Inference only: the kernels have no backward, so nothing (embeddings, norms) is trainable.
    model.requires_grad_(False)
    return done


def _quantized(linear: nn.Linear, method: str, group_size: int | None) -> QuantLinear:
    k, n, bias = linear.in_features, linear.out_features, linear.bias is not None
    if linear.weight.is_meta:
        if method == "int8":
            return Int8Linear(k, n, bias, device="meta")
        assert group_size is not None
        return Int4Linear(k, n, bias, group_size, device="meta")
    if method == "int8":
        return Int8Linear.from_float(linear)
    assert group_size is not None
    return Int4Linear.from_float(linear, group_size)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def refuse_training(model: nn.Module, name: str) -> None:
    """One line for training a quantized model (its kernels have no backward)."""
    quant = quantization_of(model)
    if quant is not None:
        raise LmforgeError(
            f"{name} is quantized ({quant.method}) and cannot be trained: train the float "
            "model, then quantize the result"
        )


def quantization_of(model: nn.Module) -> QuantConfig | None:
    """The QuantConfig MODEL was quantized with (read from its layers); None if it was not."""
    head = getattr(model, "lm_head", None)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and m is not head]
    if not layers:
        return None
    first = layers[0]
    group = first.group_size if isinstance(first, Int4Linear) else None
    head_method = head.method if isinstance(head, QuantLinear) else "float"
    if isinstance(head, Int4Linear):
        group = head.group_size
    return QuantConfig(first.method, group, head=head_method)
