"""The key/value cache: allocated by its owner (the generator or the engine), passed to forward.

Layout: one tensor for keys and one for values, `[n_layer, B, n_kv_head, max_len, head_dim]`.
Row `b` is a slot; `Transformer.forward` writes the keys and values of each token at its
position and reads the prefix it attends to. The model never allocates or keeps a cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.model.transformer import ModelConfig


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
