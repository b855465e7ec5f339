"""Token shards and the data set manifest: the files a prepared data set is made of.

A shard is a flat little-endian array of token ids (`uint16` when the vocabulary fits in 16
bits, else `uint32`) with no header — nanoGPT's `train.bin` format, so `np.memmap(path,
dtype=...)` reads it. Splits are written as `train_000.bin`, `train_001.bin`, … , each at
most `max_tokens` long; documents may straddle two shards (the loader reads a split as one
stream). `manifest.json` says everything else: sources, counts, tokenizer, shard hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from lmforge.atomic import write_text_atomic
from lmforge.data.sources import file_sha256
from lmforge.errors import CorruptArtifactError, LmforgeError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
SPLITS = ("train", "val", "test")


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    """The narrowest unsigned dtype that holds every id of a VOCAB_SIZE vocabulary."""
    if vocab_size <= 0:
        raise LmforgeError(f"vocabulary size must be positive, not {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class ShardInfo:
    file: str  # name inside the data set directory
    split: str
    tokens: int
    sha256: str


class ShardWriter:
    """Append token arrays to one split's shards, rolling to a new file every MAX_TOKENS."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype[Any], max_tokens: int) -> None:
        if max_tokens < 1:
            raise LmforgeError(f"shard size must be at least 1 token, not {max_tokens}")
        self.directory = directory
        self.split = split
        self.dtype = dtype
        self.max_tokens = max_tokens
        self.shards: list[ShardInfo] = []
        self.tokens = 0
        self._file: IO[bytes] | None = None
        self._digest = hashlib.sha256()
        self._in_file = 0

    def write(self, ids: np.ndarray) -> None:
        data = np.ascontiguousarray(ids, dtype=self.dtype.newbyteorder("<"))
        while data.size:
            if self._file is None:
                self._open()
            room = self.max_tokens - self._in_file
            piece, data = data[:room], data[room:]
            raw = piece.tobytes()
            assert self._file is not None
            self._file.write(raw)
            self._digest.update(raw)
            self._in_file += piece.size
            self.tokens += piece.size
            if self._in_file >= self.max_tokens:
                self._close()

    def close(self) -> list[ShardInfo]:
        """Finish the last shard (fsynced) and return all of them."""
        self._close()
        return self.shards

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._file = open(self.directory / name, "wb")  # noqa: SIM115 - closed in _close
        self._digest = hashlib.sha256()
        self._in_file = 0

    def _close(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = Path(self._file.name).name
        self.shards.append(ShardInfo(name, self.split, self._in_file, self._digest.hexdigest()))
        self._file = None


def write_manifest(directory: Path, manifest: dict[str, Any]) -> str:
    """Write manifest.json atomically; return its sha256."""
    text = json.dumps(manifest, indent=2, ensure_ascii=False, sort_keys=False) + "\n"
    write_text_atomic(directory / MANIFEST, text)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of the data set in DIRECTORY."""
    path = directory / MANIFEST
    if not path.is_file():
        raise CorruptArtifactError(f"{directory} is not a data set (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptArtifactError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CorruptArtifactError(f"{path}: unknown manifest format")
    return manifest


def shard_infos(manifest: dict[str, Any], split: str | None = None) -> list[ShardInfo]:
    """The shards a manifest lists (of one SPLIT, or all), in order."""
    infos = [ShardInfo(**s) for s in manifest.get("shards", [])]
    return [s for s in infos if split is None or s.split == split]


def verify_shards(directory: Path, manifest: dict[str, Any]) -> None:
    """Raise `CorruptArtifactError` unless every shard has its recorded size and sha256."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for shard in shard_infos(manifest):
        path = directory / shard.file
        if not path.is_file():
            raise CorruptArtifactError(f"{path} is missing")
        if path.stat().st_size != shard.tokens * itemsize:
            raise CorruptArtifactError(f"{path} has the wrong size (truncated?)")
        if file_sha256(path) != shard.sha256:
            raise CorruptArtifactError(f"{path}: sha256 differs from the manifest")


def shards_dict(shards: list[ShardInfo]) -> list[dict[str, Any]]:
    return [asdict(s) for s in shards]
