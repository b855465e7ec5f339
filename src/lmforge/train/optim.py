"""The optimizer and the learning-rate schedule of the training loop.

AdamW over two parameter groups, nanoGPT's rule: every matrix (embeddings and linear weights,
`dim >= 2`) decays, biases and norm weights (`dim < 2`) do not. The schedule is linear warmup
to `lr`, then a cosine down to `min_lr` at `max_steps` (nanoGPT `train.py` `get_lr`, with the
decay ending at the last step).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.errors import LmforgeError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """[decayed matrices, undecayed vectors] of MODEL's trainable parameters, each once."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:  # tied weights appear twice
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over `param_groups`, with the fused kernel."""
    if not (lr > 0 and math.isfinite(lr)):
        raise LmforgeError(f"--lr must be a positive number, not {lr}")
    if not 0 <= weight_decay < 1:
        raise LmforgeError(f"--weight-decay must be in [0, 1), not {weight_decay}")
    for name, beta in zip(("--beta1", "--beta2"), betas, strict=True):
        if not 0 <= beta < 1:
            raise LmforgeError(f"{name} must be in [0, 1), not {beta}")
    groups = param_groups(model, weight_decay)
    # The fused kernel on every device: one pass per parameter instead of a dozen. On CPU,
    # torch's default is the per-tensor loop (foreach defaults on for CUDA only); measured for
    # nanogpt-shakespeare-cpu (0.8 M parameters, 2 threads, torch 2.13): loop 2.17 ms per step,
    # foreach 2.76 ms, fused 0.45 ms.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, max_steps: int) -> float:
    """The learning rate of STEP (0-based): linear warmup, then cosine from LR to MIN_LR."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step >= max_steps:
        return min_lr
    progress = (step - warmup) / max(1, max_steps - warmup)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 → 0
    return min_lr + coeff * (lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
