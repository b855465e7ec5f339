"""The paged KV cache's bookkeeping: a pool of fixed-size blocks, block tables, prefix hashes.

Pure Python (no torch): the scheduler decides with it, the `ModelRunner` owns the tensors it
describes (`model.kv_cache.PagedKVCache`). Block ids index the pool's blocks of `block_size`
token slots each; a request's `block_ids` (its block table) lists the blocks that hold its
tokens 0.., in order.

Prefix caching (after vLLM's automatic prefix caching and nano-vllm's block manager): a block
whose `block_size` tokens are all computed gets a hash chained over every token before it and
a salt (the model version), so equal hashes mean equal keys and values. A new request looks up
its full blocks' hashes, shares the longest cached run (reference counts), and computes only
the rest. A block whose last user finished stays in the cache, in the free queue, until it is
needed for something else: the free queue hands out never-used and uncached blocks first, then
the least recently freed cached ones (their hash is forgotten then).

Block 0 is never handed out: padding in a batch reads it (the runner keeps it zero).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

NULL_BLOCK = 0
"""Read by padding positions of block tables; never allocated, never written."""


def hash_block(parent: bytes | None, token_ids: Sequence[int], salt: bytes) -> bytes:
    """The prefix hash of a full block: PARENT (None for the first block, which takes SALT
    instead) chained with the block's token ids. 128-bit BLAKE2b: a collision would silently
    share the wrong keys and values, so no 64-bit `hash()`."""
    h = hashlib.blake2b(parent if parent is not None else salt, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass
class BlockStats:
    queries: int = 0
    """Prompt tokens looked up in the prefix cache."""
    hits: int = 0
    """Of those, tokens found."""
    evictions: int = 0
    """Cached blocks whose hash was dropped to reuse them."""


class BlockPool:
    """NUM_BLOCKS usable blocks (ids 1..NUM_BLOCKS), reference counted, with the hash table of
    the cached ones and the free queue."""

    def __init__(self, num_blocks: int, block_size: int, *, caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self.ref_counts = [0] * (num_blocks + 1)
        self.hashes: list[bytes | None] = [None] * (num_blocks + 1)
        self.cached: dict[bytes, int] = {}  # hash → block id
        # Free blocks, handed out from the front. Never-used and uncached blocks go to the
        # front, cached ones to the back in the order they were freed (least recent first).
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks + 1))
        self.stats = BlockStats()

    # -- counting ------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (cached ones not in use included)."""
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache --------------------------------------------------------------------------

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The blocks of the longest cached prefix of HASHES (not yet taken: see `take`)."""
        found = []
        if self.caching:
            for h in hashes:
                block = self.cached.get(h)
                if block is None:
                    break
                found.append(block)
        return found

    def take(self, block_ids: Sequence[int]) -> None:
        """Share cached BLOCK_IDS (from `lookup`): one more reference each."""
        for block in block_ids:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1

    def num_free_after_taking(self, block_ids: Sequence[int]) -> int:
        """`num_free` once BLOCK_IDS are taken (those not in use leave the free queue)."""
        return len(self.free) - sum(1 for b in block_ids if self.ref_counts[b] == 0)

    def register(self, block_id: int, block_hash: bytes) -> None:
        """Mark a full, computed block as holding the prefix BLOCK_HASH. If another block holds
        it already (two requests computed the same prefix at once), this one stays private."""
        if not self.caching or self.hashes[block_id] is not None:
            return
        if block_hash not in self.cached:
            self.cached[block_hash] = block_id
            self.hashes[block_id] = block_hash

    def forget(self, block_ids: Sequence[int]) -> None:
        """Drop BLOCK_IDS from the prefix cache (their contents are not to be shared)."""
        for block in block_ids:
            h = self.hashes[block]
            if h is not None:
                del self.cached[h]
                self.hashes[block] = None

    # -- allocation ----------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """N blocks for one user each; raises if fewer are free (check `num_free` first)."""
        if n > len(self.free):
            raise RuntimeError(f"{n} blocks asked, {len(self.free)} free")
        out = []
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            h = self.hashes[block]
            if h is not None:  # the least recently used cached block: evict it
                del self.cached[h]
                self.hashes[block] = None
                self.stats.evictions += 1
            self.ref_counts[block] = 1
            out.append(block)
        return out

    def release(self, block_ids: Sequence[int]) -> None:
        """One reference less on each of BLOCK_IDS (a request's table). Blocks nobody uses go
        back to the free queue: cached ones last, the table's tail before its head (a shared
        prefix outlives the suffixes that continue it), uncached ones first."""
        for block in reversed(block_ids):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] < 0:
                raise RuntimeError(f"block {block} released more often than taken")
            if self.ref_counts[block] == 0:
                self.free[block] = None
                if self.hashes[block] is None:
                    self.free.move_to_end(block, last=False)

    def check(self) -> None:
        """Raise if the accounting is inconsistent (tests and debugging)."""
        for block in range(1, self.num_blocks + 1):
            in_free = block in self.free
            if in_free != (self.ref_counts[block] == 0):
                raise AssertionError(
                    f"block {block}: refs {self.ref_counts[block]}, free {in_free}"
                )
        for h, block in self.cached.items():
            if self.hashes[block] != h:
                raise AssertionError(f"block {block}: hash table and block disagree")
