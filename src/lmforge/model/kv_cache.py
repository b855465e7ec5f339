"""Key/value caches: allocated by their owner (the generator or the engine), passed to forward.

Two layouts, one interface: `Transformer.hidden_states` asks the cache for a layer's view and
calls `update(k, v, plan)`, which stores the new tokens' keys and values and returns the keys
and values the new tokens attend over, [B, Hkv, Tk, D]. The model never allocates or keeps a
cache.

- `KVCache`: one contiguous row per sequence, `[n_layer, B, n_kv_head, max_len, head_dim]`;
  a token's keys and values live at its position. Single-sequence generation and tests use it.
- `PagedKVCache`: the engine's pool of fixed-size blocks, `[n_layer, slots, n_kv_head,
  head_dim]` with `slots = (num_blocks + 2) × block_size`: block 0 is the null block that
  padding in block tables reads (always zero), the last one takes the writes of padding
  tokens (never read). A forward call gets a `PagedBatch`: each row's block table and the slot of
  every new token. Writes scatter into the slots; reads gather the rows' blocks in order
  (`index_select` of whole blocks), so a row sees its tokens at their positions, and the
  attention mask hides everything past each query's position. The blocks are bookkept by
  `lmforge.infer.blocks`; this file only holds the tensors.

On the CPU the pool is an anonymous memory map: the kernel hands out zeroed pages on first
write, so resident memory grows with the blocks actually used, not with the budget.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from lmforge.model.transformer import AttentionPlan, ModelConfig


class LayerCache(Protocol):
    """One layer's view of a cache, as `Attention.forward` uses it."""

    def update(
        self, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, Hkv, T, D] of the new tokens; the keys and values to attend over."""
        ...


# ---------------------------------------------------------------------------------------------
# Contiguous rows


@dataclass
class KVCache:
    k: torch.Tensor  # [L, B, H_kv, T_max, D]
    v: torch.Tensor  # [L, B, H_kv, T_max, D]

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        if max_len > config.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model context {config.max_seq_len}")
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        return cls(
            k=torch.zeros(shape, dtype=dtype, device=device),
            v=torch.zeros(shape, dtype=dtype, device=device),
        )

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def layer(self, i: int) -> _RowsLayer:
        return _RowsLayer(self.k[i], self.v[i])


@dataclass
class _RowsLayer:
    k: torch.Tensor  # [B, Hkv, T_max, D]
    v: torch.Tensor

    def update(
        self, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, t, _ = k.shape
        if plan.write_start is not None:
            s = plan.write_start
            self.k[:, :, s : s + t] = k
            self.v[:, :, s : s + t] = v
        else:
            rows = torch.arange(b, device=k.device).unsqueeze(1).expand(b, t)
            self.k[rows, :, plan.positions] = k.transpose(1, 2)
            self.v[rows, :, plan.positions] = v.transpose(1, 2)
        return self.k[:, :, : plan.k_len], self.v[:, :, : plan.k_len]


# ---------------------------------------------------------------------------------------------
# Paged blocks


def _zeroed(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor of NUMEL elements; on the CPU backed by pages the kernel maps (zeroed)
    only when first written."""
    if device.type != "cpu" or numel == 0:
        return torch.zeros(numel, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    buffer = mmap.mmap(-1, numel * itemsize)  # anonymous: zero-filled, lazily backed
    return torch.frombuffer(buffer, dtype=dtype, count=numel)


@dataclass
class PagedKVCache:
    k: torch.Tensor  # [L, S, H_kv, D], S = (num_blocks + 2) · block_size slots
    v: torch.Tensor
    block_size: int

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> PagedKVCache:
        """NUM_BLOCKS usable blocks (ids 1..NUM_BLOCKS), the null block 0 and the trash block."""
        device = torch.device(device)
        shape = (config.n_layer, (num_blocks + 2) * block_size, config.n_kv_head, config.head_dim)
        numel = shape[0] * shape[1] * shape[2] * shape[3]
        k = _zeroed(numel, dtype, device).view(shape)
        v = _zeroed(numel, dtype, device).view(shape)
        return cls(k, v, block_size)

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        """Bytes of keys and values one token takes in every layer."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layer * config.n_kv_head * config.head_dim * itemsize

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1] // self.block_size - 2

    @property
    def trash_slot(self) -> int:
        """Where padding tokens' keys and values go: a slot no block table holds."""
        return (self.num_blocks + 1) * self.block_size

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def batch(self, block_tables: torch.Tensor, slot_mapping: torch.Tensor) -> PagedBatch:
        """The view one forward call uses: BLOCK_TABLES [B, nb] (padded with block 0) and
        SLOT_MAPPING [B, T], the slot each new token's keys and values go to."""
        return PagedBatch(self, block_tables, slot_mapping)

    def zero_blocks(self, block_ids: list[int]) -> None:
        """Zero the given blocks (their contents must never reach another request)."""
        if not block_ids:
            return
        size = self.block_size
        slots = torch.tensor(block_ids, device=self.k.device)[:, None] * size + torch.arange(
            size, device=self.k.device
        )
        self.k[:, slots.reshape(-1)] = 0
        self.v[:, slots.reshape(-1)] = 0


@dataclass
class PagedBatch:
    cache: PagedKVCache
    block_tables: torch.Tensor  # [B, nb] int64
    slot_mapping: torch.Tensor  # [B, T] int64

    @property
    def k_len(self) -> int:
        """Key positions each row's gathered blocks span."""
        return self.block_tables.shape[1] * self.cache.block_size

    def layer(self, i: int) -> _PagedLayer:
        return _PagedLayer(self.cache.k[i], self.cache.v[i], self)


@dataclass
class _PagedLayer:
    k: torch.Tensor  # [S, Hkv, D]
    v: torch.Tensor
    batch: PagedBatch

    def update(
        self, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, hkv, t, d = k.shape
        slots = self.batch.slot_mapping.reshape(-1)  # [B·T]
        self.k.index_copy_(0, slots, k.transpose(1, 2).reshape(b * t, hkv, d))
        self.v.index_copy_(0, slots, v.transpose(1, 2).reshape(b * t, hkv, d))
        size = self.batch.cache.block_size
        tables = self.batch.block_tables.reshape(-1)  # [B·nb]
        tk = self.batch.k_len

        def gather(pool: torch.Tensor) -> torch.Tensor:
            blocks = pool.view(-1, size, hkv, d).index_select(0, tables)  # [B·nb, bs, Hkv, D]
            return blocks.view(b, tk, hkv, d).transpose(1, 2)  # [B, Hkv, Tk, D]

        return gather(self.k), gather(self.v)
