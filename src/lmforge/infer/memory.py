"""The KV cache's memory budget: `--kv-cache-memory 1GB` → how many tokens the block pool holds.

The pool is sized as a budget of bytes, not as `max_batch × max_model_len` rows (vLLM's and
SGLang's way): requests take blocks as their tokens arrive, so a budget well below the worst
case serves the same load unless every request runs to the full context at once (then the
newest are preempted and recomputed later). On the CPU the pool's pages become resident only
when first written (`model.kv_cache.PagedKVCache`), so an unused budget costs nothing.

The default budget is what `max_batch` requests at `max_model_len` tokens need, capped at half
of the memory this machine has (on a GPU: half of its free memory once the model is loaded).
"""

from __future__ import annotations

import os
import re

import torch

from lmforge.errors import LmforgeError
from lmforge.model.kv_cache import PagedKVCache
from lmforge.model.transformer import ModelConfig

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)

MACHINE_SHARE = 0.5
"""The default budget takes at most this share of the machine's memory."""


def parse_size(text: str, *, name: str = "size") -> int:
    """Bytes in TEXT: "1GB", "512MiB", "1.5 GiB", "800000000" (decimal and binary units)."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise LmforgeError(f"{name} must be a size such as 1GB, 512MiB or 800000000, got {text!r}")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise LmforgeError(f"{name} must be more than 0 bytes, got {text!r}")
    return value


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def machine_memory(device: torch.device) -> int:
    """Bytes this device can give the KV cache at most: physical memory on the CPU, free
    memory on a GPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_cache_tokens(
    config: ModelConfig,
    dtype: torch.dtype,
    *,
    max_batch: int,
    max_model_len: int,
    budget: int | None,
    device: torch.device,
    block_size: int = 16,
) -> int:
    """Token slots for the pool: BUDGET bytes (None: the default above), whole blocks. Refused
    when it cannot hold one request at MAX_MODEL_LEN."""
    per_token = PagedKVCache.bytes_per_token(config, dtype)
    if budget is None:
        full = max_batch * max_model_len * per_token
        budget = min(full, int(MACHINE_SHARE * machine_memory(device)))
    tokens = budget // per_token // block_size * block_size
    if tokens < max_model_len:
        need = -(-max_model_len // block_size) * block_size * per_token
        raise LmforgeError(
            f"--kv-cache-memory {format_size(budget)} holds {tokens} tokens; one request at "
            f"max_model_len {max_model_len} needs {format_size(need)} "
            f"({format_size(per_token)} per token): raise it or lower --max-model-len"
        )
    return tokens
