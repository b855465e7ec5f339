"""The KV cache budget: sizes parsed, bytes → tokens, the default, and a budget too small."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from lmforge.errors import LmforgeError
from lmforge.infer.memory import kv_cache_tokens, parse_size
from lmforge.model.kv_cache import PagedKVCache


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1GB", 10**9),
        ("1gb", 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5 GiB", int(1.5 * 2**30)),
        ("800000000", 800_000_000),
        ("64k", 64_000),
    ],
)
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GB", "1 XB", "-1GB", "0", "1e9", "one gig"])
def test_bad_sizes_name_the_flag(text: str) -> None:
    with pytest.raises(LmforgeError, match="--kv-cache-memory"):
        parse_size(text, name="--kv-cache-memory")


def test_budget_to_tokens() -> None:
    config = tiny_config("llama", max_seq_len=2048)  # 2 layers × 2 kv heads × 8 dims
    per_token = PagedKVCache.bytes_per_token(config, torch.float32)
    assert per_token == 2 * 2 * 2 * 8 * 4
    cpu = torch.device("cpu")
    tokens = kv_cache_tokens(
        config, torch.float32, max_batch=4, max_model_len=256, budget=10**6, device=cpu
    )
    assert tokens == 10**6 // per_token // 16 * 16
    # the default: every request at full length, when the machine has room for it
    default = kv_cache_tokens(
        config, torch.float32, max_batch=4, max_model_len=256, budget=None, device=cpu
    )
    assert default == 4 * 256
    with pytest.raises(LmforgeError, match=r"one request at max_model_len 256 needs 64\.00 KiB"):
        kv_cache_tokens(
            config, torch.float32, max_batch=4, max_model_len=256, budget=1000, device=cpu
        )
