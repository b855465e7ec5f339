"""Shards (rolling files, hashes, dtype) and the (x, y) loader checked against plain slicing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_token_dataset
from lmforge.data.loader import TokenSplit, eval_batches, random_batches
from lmforge.data.shards import (
    read_manifest,
    token_dtype,
    verify_shards,
)
from lmforge.errors import CorruptArtifactError, LmforgeError


def make_dataset(
    directory: Path, tokens: np.ndarray, max_tokens: int, vocab_size: int = 1000
) -> None:
    write_token_dataset(directory, {"train": tokens}, vocab_size, max_tokens)


def test_token_dtype_is_the_narrowest_that_fits() -> None:
    assert token_dtype(65) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    with pytest.raises(LmforgeError):
        token_dtype(0)


def test_writer_rolls_files_and_records_sizes_and_hashes(tmp_path: Path) -> None:
    tokens = np.arange(2500) % 1000
    make_dataset(tmp_path, tokens, max_tokens=1000)
    manifest = read_manifest(tmp_path)
    shards = manifest["shards"]
    assert [s["file"] for s in shards] == ["train_000.bin", "train_001.bin", "train_002.bin"]
    assert [s["tokens"] for s in shards] == [1000, 1000, 500]
    joined = np.concatenate([np.fromfile(tmp_path / s["file"], dtype="<u2") for s in shards])
    assert np.array_equal(joined, tokens)
    for s in shards:
        assert hashlib.sha256((tmp_path / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    verify_shards(tmp_path, manifest)


def test_verify_detects_truncated_and_altered_shards(tmp_path: Path) -> None:
    make_dataset(tmp_path, np.arange(3000) % 1000, max_tokens=1000)
    manifest = read_manifest(tmp_path)
    shard = tmp_path / "train_001.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="sha256"):
        verify_shards(tmp_path, manifest)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(CorruptArtifactError, match="wrong size"):
        verify_shards(tmp_path, manifest)
    with pytest.raises(CorruptArtifactError, match="wrong size"):
        TokenSplit.open(tmp_path, "train")


def test_split_reads_across_shards_like_one_array(tmp_path: Path) -> None:
    tokens = np.random.default_rng(0).integers(0, 1000, 5000)
    make_dataset(tmp_path, tokens, max_tokens=777)
    split = TokenSplit.open(tmp_path, "train")
    assert len(split) == 5000 and split.vocab_size == 1000
    for start, length in ((0, 10), (770, 20), (776, 1), (777, 777), (100, 3000), (4990, 10)):
        assert np.array_equal(split.read(start, length), tokens[start : start + length])
    with pytest.raises(IndexError):
        split.read(4995, 10)
    with pytest.raises(LmforgeError, match=r"no 'val' split .*has: train"):
        TokenSplit.open(tmp_path, "val")


def test_random_batches_are_shifted_windows_from_the_data_and_reproducible(tmp_path: Path) -> None:
    tokens = np.random.default_rng(1).integers(0, 1000, 4000)
    make_dataset(tmp_path, tokens, max_tokens=900)
    split = TokenSplit.open(tmp_path, "train")
    batches = random_batches(split, 8, 32, generator=torch.Generator().manual_seed(5))
    x, y = next(batches)
    assert x.shape == y.shape == (8, 32) and x.dtype == torch.int64
    # The reference: nanoGPT's get_batch with the same offsets.
    starts = torch.randint(4000 - 32, (8,), generator=torch.Generator().manual_seed(5))
    for row, i in enumerate(starts.tolist()):
        assert x[row].tolist() == tokens[i : i + 32].tolist()
        assert y[row].tolist() == tokens[i + 1 : i + 33].tolist()
    again = next(random_batches(split, 8, 32, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(again[0], x)


def test_eval_batches_predict_every_token_once_in_order(tmp_path: Path) -> None:
    tokens = np.random.default_rng(2).integers(0, 1000, 1000)
    make_dataset(tmp_path, tokens, max_tokens=300)
    split = TokenSplit.open(tmp_path, "train")
    xs, ys = zip(*eval_batches(split, 4, 64), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    n = (1000 - 1) // 64  # windows that fit with their shifted target
    assert x.shape == (n, 64)
    assert x.flatten().tolist() == tokens[: n * 64].tolist()
    assert y.flatten().tolist() == tokens[1 : n * 64 + 1].tolist()
    assert len(list(eval_batches(split, 4, 64, max_batches=2))) == 2


def test_split_too_short_for_a_window_is_a_clear_error(tmp_path: Path) -> None:
    make_dataset(tmp_path, np.arange(50), max_tokens=1000)
    split = TokenSplit.open(tmp_path, "train")
    with pytest.raises(LmforgeError, match="fewer than block_size"):
        next(random_batches(split, 2, 64))
