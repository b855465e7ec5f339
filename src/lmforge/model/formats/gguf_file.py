"""A GGUF file's metadata and tensor table, read in one pass over the memory-mapped header.

`gguf.GGUFReader` builds a numpy view for every element of every metadata array: a 262,144-token
vocabulary (Gemma 3) is ~800,000 views and ~30 s before the first tensor is touched, and
`transformers` pays it twice per load. This reader parses the same header (versions 2 and 3,
little-endian) with `struct` and `np.frombuffer`, in well under a second, and hands back plain
Python values — the same values `ReaderField.contents()` gives (tests compare the two on every
file they write). Tensor data stays in the file: each tensor is a read-only memory-mapped numpy
array shaped as `GGUFReader` shapes it (typed for F16/F32/F64/I8…I64, bytes per row for block
quantized types), which is what `gguf.quants.dequantize` takes. Value types, tensor types and
block sizes are the `gguf` package's own constants."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmforge.errors import CorruptArtifactError

if TYPE_CHECKING:
    from gguf.constants import GGMLQuantizationType

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUFValueType → (struct format, numpy dtype) for the fixed-size scalar types
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"),
    1: ("<b", "<i1"),
    2: ("<H", "<u2"),
    3: ("<h", "<i2"),
    4: ("<I", "<u4"),
    5: ("<i", "<i4"),
    6: ("<f", "<f4"),
    7: ("<?", "<u1"),  # bool: one byte
    10: ("<Q", "<u8"),
    11: ("<q", "<i8"),
    12: ("<d", "<f8"),
}
_STRING, _ARRAY, _BOOL = 8, 9, 7
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (the file stores it reversed)
    data: np.ndarray  # memory-mapped, read-only; bytes per row for block-quantized types


class GGUFFile:
    """PATH's metadata (`metadata`: key → value) and tensors (`tensors`, in file order)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
            raise CorruptArtifactError(f"{path} is not a readable GGUF file: {exc}") from None
        self._pos = 0
        try:
            self.version, self.metadata, self.tensors = self._parse()
        except (struct.error, ValueError, UnicodeDecodeError, IndexError) as exc:
            raise CorruptArtifactError(f"{path} is not a readable GGUF file: {exc}") from None

    # --- the header ------------------------------------------------------------------------------

    def _parse(self) -> tuple[int, dict[str, Any], list[GGUFTensor]]:
        if bytes(self._buf[:4]) != MAGIC:
            raise ValueError("bad magic (not a GGUF file)")
        self._pos = 4
        version = self._u32()
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (this reader handles 2 and 3, little-endian)")
        n_tensors, n_kv = self._u64(), self._u64()
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            metadata[key] = self._value(self._u32())
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment {alignment} is not a power of two")
        start = -(-self._pos // alignment) * alignment
        return version, metadata, self._tensors(infos, start)

    def _u32(self) -> int:
        (v,) = _U32.unpack_from(self._buf, self._pos)
        self._pos += 4
        return int(v)

    def _u64(self) -> int:
        (v,) = _U64.unpack_from(self._buf, self._pos)
        self._pos += 8
        return int(v)

    def _string(self) -> str:
        n = self._u64()
        end = self._pos + n
        if end > len(self._buf):
            raise ValueError("a string runs past the end of the file")
        s = self._buf[self._pos : end].decode("utf-8")
        self._pos = end
        return s

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            sub, count = self._u32(), self._u64()
            if sub == _STRING:
                return [self._string() for _ in range(count)]
            if sub in _SCALARS:
                dtype = np.dtype(_SCALARS[sub][1])
                arr = np.frombuffer(self._buf, dtype, count, self._pos)
                self._pos += count * dtype.itemsize
                return [bool(x) for x in arr] if sub == _BOOL else arr.tolist()
            return [self._value(sub) for _ in range(count)]  # arrays of arrays
        if kind in _SCALARS:
            fmt = _SCALARS[kind][0]
            (v,) = struct.unpack_from(fmt, self._buf, self._pos)
            self._pos += struct.calcsize(fmt)
            return v
        raise ValueError(f"unknown metadata value type {kind}")

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string()
        dims = tuple(self._u64() for _ in range(self._u32()))
        kind = self._u32()
        return name, tuple(reversed(dims)), kind, self._u64()

    # --- the tensors -----------------------------------------------------------------------------

    def _tensors(
        self, infos: list[tuple[str, tuple[int, ...], int, int]], start: int
    ) -> list[GGUFTensor]:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        typed = {
            GGMLQuantizationType.F16: np.float16,
            GGMLQuantizationType.F32: np.float32,
            GGMLQuantizationType.F64: np.float64,
            GGMLQuantizationType.I8: np.int8,
            GGMLQuantizationType.I16: np.int16,
            GGMLQuantizationType.I32: np.int32,
            GGMLQuantizationType.I64: np.int64,
        }
        seen: set[str] = set()
        out = []
        for name, shape, kind, offset in infos:
            if name in seen:
                raise ValueError(f"tensor {name} appears twice")
            seen.add(name)
            qtype = GGMLQuantizationType(kind)
            n = int(np.prod(shape, dtype=np.int64))
            block, size = GGML_QUANT_SIZES[qtype]
            dtype = typed.get(qtype)
            if dtype is not None:
                np_shape, count, item = shape, n, np.dtype(dtype).newbyteorder("<")
            else:
                np_shape, count, item = (
                    quant_shape_to_byte_shape(shape, qtype),
                    n * size // block,
                    np.dtype(np.uint8),
                )
            begin = start + offset
            if begin + count * item.itemsize > len(self._buf):
                raise ValueError(f"tensor {name} runs past the end of the file")
            data = np.frombuffer(self._buf, item, count, begin).reshape(np_shape)
            out.append(GGUFTensor(name, qtype, tuple(shape), data))
        return out
