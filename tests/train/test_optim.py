"""Optimizer groups and the LR schedule, checked against nanoGPT's formulas and plain AdamW."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model.transformer import ModelConfig, Transformer
from lmforge.train.optim import build_optimizer, lr_at, param_groups


def nanogpt_get_lr(it: int, lr: float, min_lr: float, warmup: int, decay_iters: int) -> float:
    """nanoGPT train.py get_lr, restated."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup) / (decay_iters - warmup)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return min_lr + coeff * (lr - min_lr)


def test_schedule_matches_nanogpt() -> None:
    for step in range(0, 2001, 7):
        want = nanogpt_get_lr(step, 1e-3, 1e-4, 100, 2000)
        got = lr_at(step, lr=1e-3, min_lr=1e-4, warmup=100, max_steps=2000)
        assert got == pytest.approx(want, rel=1e-12), step
    assert lr_at(5000, lr=1e-3, min_lr=1e-4, warmup=100, max_steps=2000) == 1e-4
    assert lr_at(0, lr=1.0, min_lr=0.0, warmup=0, max_steps=10) == 1.0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_matrices_decay_vectors_do_not_and_every_parameter_appears_once(arch: str) -> None:
    config = ModelConfig(
        arch=arch,
        vocab_size=64,
        d_model=32,
        n_layer=2,
        n_head=4,
        n_kv_head=2 if arch == "llama" else 4,
        d_ff=64,
        max_seq_len=16,
    )
    model = Transformer(config)
    decay, no_decay = param_groups(model, 0.1)
    ids = [id(p) for p in [*decay["params"], *no_decay["params"]]]  # type: ignore[misc]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})
    assert all(p.dim() >= 2 for p in decay["params"])  # type: ignore[attr-defined]
    assert all(p.dim() < 2 for p in no_decay["params"])  # type: ignore[attr-defined]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert no_decay["params"]  # norms (and gpt2 biases) exist


def test_a_step_equals_torch_adamw_with_the_same_groups() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    reference = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    reference.load_state_dict(model.state_dict())
    ours = build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
    matrices = [p for p in reference.parameters() if p.dim() >= 2]
    vectors = [p for p in reference.parameters() if p.dim() < 2]
    theirs = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}],
        lr=1e-2,
        betas=(0.9, 0.99),
    )
    x = torch.randn(4, 8)
    for _ in range(3):
        for m, opt in ((model, ours), (reference, theirs)):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    # Ours is the fused kernel, the reference the per-tensor loop: equal up to float rounding.
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_bad_hyperparameters_name_the_flag() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(LmforgeError, match="--lr"):
        build_optimizer(model, lr=0.0, weight_decay=0.1)
    with pytest.raises(LmforgeError, match="--beta2"):
        build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 1.0))
    with pytest.raises(LmforgeError, match="--weight-decay"):
        build_optimizer(model, lr=1e-3, weight_decay=-1)
