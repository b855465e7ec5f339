"""(x, y) batches from a prepared data set's token shards.

A split (`train`, `val`, `test`) is read as one stream of token ids, its shards memory-mapped
in order (nothing is loaded up front). Training draws random windows, nanoGPT-style: `x` is
`block_size` ids from a random offset, `y` the same window shifted by one. Evaluation walks
the split in consecutive non-overlapping windows so every token is predicted exactly once.

    split = TokenSplit.open(dataset_dir, "train")
    for x, y in random_batches(split, batch_size=12, block_size=256, generator=g): ...
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.shards import read_manifest, shard_infos
from lmforge.errors import CorruptArtifactError, LmforgeError


@dataclass
class TokenSplit:
    """One split of a data set as a single stream over its memory-mapped shards."""

    name: str
    shards: list[np.memmap[Any, Any]]
    vocab_size: int

    def __post_init__(self) -> None:
        sizes = [len(s) for s in self.shards]
        self.offsets = np.cumsum([0, *sizes])  # shard i covers [offsets[i], offsets[i + 1])

    @classmethod
    def open(cls, directory: str | Path, split: str = "train") -> TokenSplit:
        d = Path(directory).expanduser()
        manifest = read_manifest(d)
        dtype = np.dtype(manifest["dtype"])
        infos = shard_infos(manifest, split)
        if not infos:
            have = sorted({s.split for s in shard_infos(manifest)})
            raise LmforgeError(f"data set {d.name} has no {split!r} split (has: {', '.join(have)})")
        shards = []
        for info in infos:
            path = d / info.file
            if not path.is_file() or path.stat().st_size != info.tokens * dtype.itemsize:
                raise CorruptArtifactError(f"{path} is missing or has the wrong size")
            shards.append(np.memmap(path, dtype=dtype, mode="r"))
        return cls(split, shards, int(manifest["tokenizer"]["vocab_size"]))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """LENGTH ids from position START, crossing shard boundaries as needed."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) outside 0..{len(self)}")
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces, need, i = [], length, first
        pos = start - int(self.offsets[first])
        while need > 0:
            piece = self.shards[i][pos : pos + need]
            pieces.append(piece)
            need -= len(piece)
            i, pos = i + 1, 0
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _windows(
    split: TokenSplit, starts: list[int], block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([split.read(s, block_size + 1) for s in starts]).astype(np.int64)
    data = torch.from_numpy(rows)  # [B, T + 1]
    return data[:, :-1], data[:, 1:]


def check_windows(split: TokenSplit, batch_size: int, block_size: int) -> None:
    if batch_size < 1 or block_size < 1:
        raise LmforgeError("batch_size and block_size must be positive")
    if len(split) < block_size + 1:
        raise LmforgeError(
            f"the {split.name} split has {len(split)} tokens, fewer than block_size + 1 = "
            f"{block_size + 1}: use a smaller block size or more data"
        )


def random_batches(
    split: TokenSplit,
    batch_size: int,
    block_size: int,
    *,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (x, y) int64 batches [B, T] of windows at uniformly random offsets.

    The offsets come from GENERATOR, so saving its state makes the stream resumable.
    """
    check_windows(split, batch_size, block_size)
    high = len(split) - block_size  # last valid start + 1 (y needs one more id)
    while True:
        starts = torch.randint(high, (batch_size,), generator=generator).tolist()
        x, y = _windows(split, starts, block_size)
        yield x, y


def eval_batches(
    split: TokenSplit, batch_size: int, block_size: int, *, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches of consecutive non-overlapping windows covering the split once, in order.

    The last batch may be smaller; a tail shorter than one window is left out.
    """
    check_windows(split, batch_size, block_size)
    starts = list(range(0, len(split) - block_size, block_size))
    for n, i in enumerate(range(0, len(starts), batch_size)):
        if max_batches is not None and n >= max_batches:
            return
        yield _windows(split, starts[i : i + batch_size], block_size)
