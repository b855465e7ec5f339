"""Attention through the paged KV cache against the reference: one full forward, eager attention.

The block tables here are built by hand from shuffled block ids (so no row's blocks are
contiguous or in order), and the rows of a batch mix decodes, first chunks and continued
chunks of different lengths. Every logit must equal the reference's within 1e-5 (fp32).
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import tiny_config
from lmforge.model.kv_cache import PagedKVCache
from lmforge.model.transformer import Transformer

BLOCK = 4
TOL = 1e-5


@pytest.fixture(params=["llama", "gpt2"])
def model(request: pytest.FixtureRequest) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(request.param, max_seq_len=128)).eval()


def reference_logits(model: Transformer, ids: list[int]) -> torch.Tensor:
    """Logits [T, V] of IDS from one forward without a cache, eager attention."""
    impl = model.attn_impl
    model.attn_impl = "eager"
    try:
        with torch.inference_mode():
            return model(torch.tensor([ids]))[0].float()
    finally:
        model.attn_impl = impl


class Pages:
    """A hand-rolled block allocator over a PagedKVCache: shuffled free block ids."""

    def __init__(self, model: Transformer, num_blocks: int = 64, seed: int = 0) -> None:
        self.cache = PagedKVCache.allocate(model.config, num_blocks, BLOCK)
        self.free = list(range(1, num_blocks + 1))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[str, list[int]] = {}

    def ensure(self, name: str, num_tokens: int) -> list[int]:
        table = self.tables.setdefault(name, [])
        while len(table) * BLOCK < num_tokens:
            table.append(self.free.pop())
        return table

    def release(self, name: str) -> None:
        self.free.extend(self.tables.pop(name))

    def forward(
        self, model: Transformer, rows: list[tuple[str, list[int], int]]
    ) -> list[torch.Tensor]:
        """One forward over ROWS (name, all token ids so far, start): tokens[start:] of each
        row are new. Returns each row's logits [T_row, V]."""
        width = max(len(ids) - start for _, ids, start in rows)
        n_blocks = max(-(-len(ids) // BLOCK) for _, ids, _ in rows)
        trash = self.cache.trash_slot
        batch_ids, positions, slots, tables = [], [], [], []
        for name, ids, start in rows:
            table = self.ensure(name, len(ids))
            new = ids[start:]
            pad = width - len(new)
            pos = list(range(start, len(ids)))
            batch_ids.append(new + [0] * pad)
            positions.append(pos + [pos[-1]] * pad)
            slots.append([table[p // BLOCK] * BLOCK + p % BLOCK for p in pos] + [trash] * pad)
            tables.append(table + [0] * (n_blocks - len(table)))
        paged = self.cache.batch(torch.tensor(tables), torch.tensor(slots))
        with torch.inference_mode():
            logits = model(torch.tensor(batch_ids), torch.tensor(positions), paged).float()
        return [logits[i, : len(ids) - start] for i, (_, ids, start) in enumerate(rows)]


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= TOL, f"max |paged - reference| = {err:.2e}"


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_mixed_batch_equals_the_reference(model: Transformer, impl: str) -> None:
    model.attn_impl = impl
    rng = random.Random(1)
    vocab = model.config.vocab_size
    seqs = {f"s{i}": [rng.randrange(vocab) for _ in range(rng.randint(3, 40))] for i in range(6)}
    pages = Pages(model)
    # step 1: s0..s2 prefill whole, s3 a first chunk of 5
    first = [(n, seqs[n], 0) for n in ("s0", "s1", "s2")] + [("s3", seqs["s3"][:5], 0)]
    for (_, ids, _), got in zip(first, pages.forward(model, first), strict=True):
        assert_close(got, reference_logits(model, ids))
    # step 2: s0..s2 decode one token each, s3 continues, s4 starts: one mixed batch
    for n in ("s0", "s1", "s2"):
        seqs[n] = seqs[n] + [rng.randrange(vocab)]
    rows = [(n, seqs[n], len(seqs[n]) - 1) for n in ("s0", "s1", "s2")]
    rows += [("s3", seqs["s3"][:17], 5), ("s4", seqs["s4"], 0)]
    for (_, ids, start), got in zip(rows, pages.forward(model, rows), strict=True):
        assert_close(got, reference_logits(model, ids)[start:])


@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 16])
def test_chunked_prefill_equals_the_reference(model: Transformer, chunk: int) -> None:
    ids = [random.Random(chunk).randrange(model.config.vocab_size) for _ in range(45)]
    want = reference_logits(model, ids)
    pages = Pages(model, seed=chunk)
    for start in range(0, len(ids), chunk):
        stop = min(start + chunk, len(ids))
        (got,) = pages.forward(model, [("r", ids[:stop], start)])
        assert_close(got, want[start:stop])


def test_preemption_and_resume_equal_the_reference(model: Transformer) -> None:
    rng = random.Random(3)
    ids = [rng.randrange(model.config.vocab_size) for _ in range(30)]
    want = reference_logits(model, ids)
    pages = Pages(model, num_blocks=16, seed=3)
    pages.forward(model, [("r", ids[:10], 0)])
    for t in range(10, 20):
        pages.forward(model, [("r", ids[: t + 1], t)])
    # preempted: its blocks go back and another sequence overwrites them
    pages.release("r")
    other = [rng.randrange(model.config.vocab_size) for _ in range(60)]
    pages.forward(model, [("other", other, 0)])
    pages.release("other")
    # resumed: recomputed from 0 into whatever blocks come next, in two chunks
    (a,) = pages.forward(model, [("r", ids[:13], 0)])
    (b,) = pages.forward(model, [("r", ids[:25], 13)])
    assert_close(a, want[:13])
    assert_close(b, want[13:25])


def test_shared_prefix_blocks_are_read_by_two_sequences(model: Transformer) -> None:
    rng = random.Random(4)
    prefix = [rng.randrange(model.config.vocab_size) for _ in range(16)]  # 4 whole blocks
    a = prefix + [rng.randrange(model.config.vocab_size) for _ in range(7)]
    b = prefix + [rng.randrange(model.config.vocab_size) for _ in range(9)]
    pages = Pages(model, seed=4)
    pages.forward(model, [("a", a, 0)])
    pages.tables["b"] = list(pages.tables["a"][:4])  # b shares a's prefix blocks
    (got,) = pages.forward(model, [("b", b, 16)])  # and computes only its own tokens
    assert_close(got, reference_logits(model, b)[16:])


def test_padding_writes_only_the_trash_slot(model: Transformer) -> None:
    pages = Pages(model, seed=5)
    cache = pages.cache
    cache.k[:, cache.trash_slot] = float("nan")
    ids = [random.Random(5).randrange(model.config.vocab_size) for _ in range(9)]
    short = ids[:2]
    got_long, got_short = pages.forward(model, [("long", ids, 0), ("short", short, 0)])
    assert_close(got_long, reference_logits(model, ids))
    assert_close(got_short, reference_logits(model, short))  # padded to 9 tokens
    assert torch.isfinite(cache.k[:, cache.trash_slot]).all()  # padding wrote there ...
    assert not cache.k[:, :BLOCK].any() and not cache.v[:, :BLOCK].any()  # ... not block 0


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_the_pool_takes_memory_only_where_written() -> None:
    config = tiny_config("llama", d_model=256, n_head=4, n_kv_head=4, n_layer=4, max_seq_len=4096)
    per_token = PagedKVCache.bytes_per_token(config, torch.float32)  # 16 KiB
    before = rss_bytes()
    cache = PagedKVCache.allocate(config, 2048, 16)  # 32768 tokens: 512 MiB
    assert cache.nbytes() == per_token * (2048 + 2) * 16
    assert rss_bytes() - before < 32 * 2**20
    cache.k[:, 16:32] = 1.0  # one block in every layer
    assert rss_bytes() - before < 32 * 2**20
    assert float(cache.k[:, 32:48].abs().sum()) == 0.0  # the rest reads as zeros
