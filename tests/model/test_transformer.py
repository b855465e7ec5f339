"""The Transformer's fast paths against slow obvious references (tiny configs, CPU)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from lmforge.model.kv_cache import KVCache
from lmforge.model.transformer import (
    ModelConfig,
    Transformer,
    causal_bmm_attention,
    decode_step,
    optimize_weight_layout,
    prefill,
)


def greedy_recompute(model: Transformer, ids: list[int], n: int) -> list[int]:
    """Reference: no cache, the whole sequence re-run for every new token."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(ids) :]


def greedy_cached(model: Transformer, ids: list[int], n: int) -> list[int]:
    cache = KVCache.allocate(model.config, 1, len(ids) + n)
    logits = prefill(model, torch.tensor([ids]), cache)
    out = []
    for i in range(n):
        tid = int(logits[0].argmax())
        out.append(tid)
        logits = decode_step(model, torch.tensor([tid]), torch.tensor([len(ids) + i]), cache)
    return out


def test_kv_cache_decode_equals_recompute(tiny_model: Transformer) -> None:
    ids = [5, 17, 99, 3, 42, 7]
    assert greedy_cached(tiny_model, ids, 40) == greedy_recompute(tiny_model, ids, 40)


def test_kv_cache_logits_equal_recompute(tiny_model: Transformer) -> None:
    torch.manual_seed(1)
    seq = torch.randint(0, tiny_model.config.vocab_size, (1, 30))
    full = tiny_model(seq)[0]  # [T, V]
    cache = KVCache.allocate(tiny_model.config, 1, 30)
    steps = [prefill(tiny_model, seq[:, :10], cache)[0]]
    for t in range(10, 30):
        steps.append(decode_step(tiny_model, seq[0, t : t + 1], torch.tensor([t]), cache)[0])
    cached = torch.stack(steps[:-1])  # logits after tokens 10..29 predict positions 10..29
    torch.testing.assert_close(cached, full[9:29], atol=1e-5, rtol=1e-5)


def test_chunked_prefill_equals_one_prefill(tiny_model: Transformer) -> None:
    seq = torch.arange(1, 41).unsqueeze(0) % tiny_model.config.vocab_size
    one = prefill(tiny_model, seq, KVCache.allocate(tiny_model.config, 1, 40))
    cache = KVCache.allocate(tiny_model.config, 1, 40)
    for start in range(0, 40, 16):
        chunked = prefill(tiny_model, seq[:, start : start + 16], cache, start=start)
    torch.testing.assert_close(chunked, one, atol=1e-5, rtol=1e-5)


def test_batched_decode_with_different_positions_equals_single(tiny_model: Transformer) -> None:
    """Rows at different positions (the engine's case) give each row's single-sequence result."""
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [11, 12, 13, 14, 15]]
    singles = [greedy_cached(tiny_model, p, 12) for p in prompts]
    cache = KVCache.allocate(tiny_model.config, len(prompts), 32)
    last = []
    for row, p in enumerate(prompts):  # prefill each row into its own cache slot
        slot = KVCache(cache.k[:, row : row + 1], cache.v[:, row : row + 1])
        last.append(prefill(tiny_model, torch.tensor([p]), slot)[0])
    logits = torch.stack(last)
    positions = torch.tensor([len(p) for p in prompts])
    outs: list[list[int]] = [[] for _ in prompts]
    for _ in range(12):
        nxt = logits.argmax(-1)
        for row in range(len(prompts)):
            outs[row].append(int(nxt[row]))
        logits = decode_step(tiny_model, nxt, positions, cache)
        positions = positions + 1
    assert outs == singles


def test_eager_and_sdpa_attention_agree(tiny_model: Transformer) -> None:
    seq = torch.randint(0, tiny_model.config.vocab_size, (2, 20))
    tiny_model.attn_impl = "eager"
    eager = tiny_model(seq)
    tiny_model.attn_impl = "sdpa"
    sdpa = tiny_model(seq)
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)


def test_training_attention_matches_eager_in_loss_and_gradients(tiny_model: Transformer) -> None:
    """With gradients on, "sdpa" takes `causal_bmm_attention` (the training path)."""
    seq = torch.randint(0, tiny_model.config.vocab_size, (2, 20))
    grads = {}
    for impl in ("eager", "sdpa"):
        tiny_model.attn_impl = impl
        tiny_model.zero_grad(set_to_none=True)
        loss = tiny_model(seq).float().logsumexp(-1).mean()
        loss.backward()
        grads[impl] = (loss.detach(), [p.grad.clone() for p in tiny_model.parameters()])
    torch.testing.assert_close(grads["sdpa"][0], grads["eager"][0], atol=1e-5, rtol=1e-5)
    for ours, ref in zip(grads["sdpa"][1], grads["eager"][1], strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_causal_bmm_attention_equals_sdpa_in_bf16() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = causal_bmm_attention(*(t.bfloat16() for t in (q, k, v)), 16**-0.5)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


def test_eager_decode_matches_sdpa_decode(tiny_model: Transformer) -> None:
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    tiny_model.attn_impl = "eager"
    eager = greedy_cached(tiny_model, ids, 20)
    tiny_model.attn_impl = "sdpa"
    assert greedy_cached(tiny_model, ids, 20) == eager


def test_weight_layout_keeps_results(tiny_model: Transformer) -> None:
    seq = torch.randint(0, tiny_model.config.vocab_size, (1, 16))
    before = tiny_model(seq)
    optimize_weight_layout(tiny_model)
    assert not tiny_model.lm_head.weight.is_contiguous()  # N ≥ K: column-major now
    torch.testing.assert_close(tiny_model(seq), before, atol=1e-5, rtol=1e-5)


def test_causality(tiny_model: Transformer) -> None:
    """Changing a later token never changes earlier logits."""
    a = torch.randint(0, tiny_model.config.vocab_size, (1, 12))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 1) % tiny_model.config.vocab_size
    torch.testing.assert_close(tiny_model(a)[0, :8], tiny_model(b)[0, :8])


def test_tied_embeddings_share_storage() -> None:
    model = Transformer(tiny_config("llama", tie_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.num_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_num_params_formula(arch: str) -> None:
    model = Transformer(tiny_config(arch))
    assert model.config.num_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_head": 5}, "n_kv_head"),
        ({"d_model": 30, "n_head": 4, "n_kv_head": 4}, "d_model"),
        ({"arch": "rwkv"}, "arch"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_config_errors_name_the_field(overrides: dict, message: str) -> None:
    base = dict(arch="llama", vocab_size=64, d_model=32, n_layer=1, n_head=4, n_kv_head=2)
    base.update(overrides)
    with pytest.raises(ValueError, match=message):
        ModelConfig(**base)


def test_context_overflow_is_an_error(tiny_model: Transformer) -> None:
    cache = KVCache.allocate(tiny_model.config, 1, tiny_model.config.max_seq_len)
    with pytest.raises(ValueError, match="beyond"):
        decode_step(
            tiny_model, torch.tensor([1]), torch.tensor([tiny_model.config.max_seq_len]), cache
        )


@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_split_linear_matches_f_linear(column_major: bool, rows: int, with_bias: bool) -> None:
    from lmforge.model.transformer import split_linear, weight_blocks

    torch.manual_seed(0)
    w = torch.randn(96, 40)
    if column_major:
        w = w.t().contiguous().t()
    bias = torch.randn(96) if with_bias else None
    x = torch.randn(rows, 1, 40)
    ref = torch.nn.functional.linear(x, w, bias)
    for parts in (2, 4):
        blocks = weight_blocks(w, parts)
        assert blocks.data_ptr() == w.data_ptr()  # a view, no copy
        torch.testing.assert_close(split_linear(x, blocks, bias), ref, atol=1e-5, rtol=1e-5)


def test_weight_layout_switches_split_path(tiny_model: Transformer) -> None:
    optimize_weight_layout(tiny_model)
    attn = tiny_model.model.layers[0].self_attn
    assert tiny_model.lm_head.blocks is not None and attn.o_proj.blocks is not None
    assert attn.o_proj.weight.is_contiguous()  # N ≤ K stays row-major
    ids = [3, 1, 4, 1, 5]
    fast = greedy_cached(tiny_model, ids, 20)
    from lmforge.model.transformer import Linear

    for module in tiny_model.modules():
        if isinstance(module, Linear):
            module.blocks = None
    assert greedy_cached(tiny_model, ids, 20) == fast


def test_split_path_ignores_a_replaced_weight(tiny_model: Transformer) -> None:
    """After `.to(dtype)` or a new weight, the cached blocks are stale and must not be used."""
    optimize_weight_layout(tiny_model)
    head = tiny_model.lm_head
    with torch.no_grad():
        head.weight.data = head.weight.data * 2  # new storage
    x = torch.randn(1, 1, tiny_model.config.d_model)
    torch.testing.assert_close(head(x), torch.nn.functional.linear(x, head.weight))
