"""LoRA: zero-initialised B is the base model; merged equals unmerged; only adapters train."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from lmforge.errors import LmforgeError
from lmforge.model.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    load_lora_state,
    lora_state_dict,
    merge_lora,
)
from lmforge.model.transformer import Transformer

IDS = torch.tensor([[1, 5, 9, 33, 2, 7, 100, 42]])


def _model(arch: str, **overrides: object) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(arch, **overrides)).eval()


def _logits(model: Transformer) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def _randomize_b(model: torch.nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_b." in name:
                p.normal_(0, 0.05)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fresh_adapters_compute_exactly_the_base(arch: str) -> None:
    model = _model(arch)
    before = _logits(model)
    paths = apply_lora(model, LoraConfig(rank=4))
    assert paths and all(isinstance(model.get_submodule(p), LoraLinear) for p in paths)
    assert torch.equal(_logits(model), before)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "targets", [("q", "v"), ("k",), ("q", "k", "v", "o", "gate", "up", "down")]
)
def test_merged_equals_unmerged(arch: str, targets: tuple[str, ...]) -> None:
    if arch == "gpt2" and targets == ("k",):
        targets = ("k", "up")
    model = _model(arch)
    base = _logits(model)
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=targets))
    _randomize_b(model)
    adapted = _logits(model)
    assert not torch.allclose(adapted, base, atol=1e-4)  # the adapters do something
    merge_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert torch.allclose(_logits(model), adapted, atol=1e-5)


def test_adapter_touches_only_its_rows_of_a_fused_layer() -> None:
    model = _model("llama")
    layer = model.model.layers[0].self_attn.qkv_proj
    apply_lora(model, LoraConfig(rank=2, targets=("v",)))
    _randomize_b(model)
    wrapped = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(wrapped, LoraLinear) and wrapped.base is layer
    x = torch.randn(3, layer.in_features)
    delta = wrapped(x) - layer(x)
    (start, end) = wrapped.slices["v"]
    assert end == layer.out_features and start > 0
    assert torch.count_nonzero(delta[:, :start]) == 0
    assert torch.count_nonzero(delta[:, start:end]) > 0


def test_only_adapters_train_and_their_state_round_trips() -> None:
    model = _model("llama")
    apply_lora(model, LoraConfig(rank=4, targets=("q", "v", "down")))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    model.train()
    _randomize_b(model)  # with B = 0, A gets no gradient; B always does
    model(IDS).float().logsumexp(-1).mean().backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in model.named_parameters()
        if ".lora_b." in n
    )
    _randomize_b(model)
    model.eval()
    state = lora_state_dict(model)
    base_size = sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n)
    assert sum(t.numel() for t in state.values()) < base_size / 5  # saved small
    expected = _logits(model)
    other = _model("llama")
    apply_lora(other, LoraConfig(rank=4, targets=("q", "v", "down")))
    load_lora_state(other, state)
    assert torch.equal(_logits(other), expected)
    wrong = _model("llama")
    apply_lora(wrong, LoraConfig(rank=2, targets=("q", "v", "down")))
    with pytest.raises(LmforgeError, match="shape"):
        load_lora_state(wrong, state)


def test_bad_settings_are_refused_in_one_line() -> None:
    with pytest.raises(LmforgeError, match="unknown LoRA target"):
        LoraConfig(targets=("q", "query"))
    with pytest.raises(LmforgeError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(LmforgeError, match="match no layer"):
        apply_lora(_model("gpt2"), LoraConfig(targets=("gate",)))
    with pytest.raises(LmforgeError, match="ties"):
        apply_lora(_model("llama", tie_embeddings=True), LoraConfig(targets=("lm_head",)))
