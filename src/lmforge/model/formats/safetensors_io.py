"""Reading Hugging Face weight files: safetensors (single or sharded), `pytorch_model.bin`
(`torch.load(weights_only=True)`: never a pickle of code), JSON files, and file checksums."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import CorruptArtifactError, ModelNotFoundError

WEIGHTS_FILE = "model.safetensors"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptArtifactError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CorruptArtifactError(f"{path} must hold a JSON object")
    return data


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 << 20  # the safetensors spec's limit on the JSON header


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors file with plain reads into fresh tensors, checking every offset.

    Not `safetensors.torch.load_file`: its tensors are views of a memory map, so the file's
    pages stay in our RSS beside the fused and re-laid-out copies the model keeps (measured on
    the built-in model: 989 MB peak after loading vs ~760 MB this way). The format is the
    documented one: u64 little-endian header size, a JSON header, then the raw bytes.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or not 2 <= n <= min(_MAX_HEADER, size - 8):
                raise ValueError("invalid header length")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            base, out = 8 + n, {}
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
                if dtype is None:
                    raise ValueError(f"{name}: unsupported dtype {info.get('dtype')!r}")
                tensor = torch.empty([int(d) for d in info["shape"]], dtype=dtype)
                start, end = (int(x) for x in info["data_offsets"])
                nbytes = tensor.numel() * tensor.element_size()
                if end - start != nbytes or start < 0 or base + end > size:
                    raise ValueError(f"{name}: data offsets out of range (truncated file?)")
                f.seek(base + start)
                raw = tensor.view(-1).view(torch.uint8).numpy()  # the tensor's own bytes
                if f.readinto(raw.data) != nbytes:
                    raise ValueError(f"{name}: file ends early")
                out[name] = tensor
            return out
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CorruptArtifactError(f"{path} is not a readable safetensors file: {exc}") from None


def read_hf_weights(d: Path) -> dict[str, torch.Tensor]:
    single = d / WEIGHTS_FILE
    index = d / "model.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = (d / shard).resolve()
            if d.resolve() not in shard_path.parents:
                raise CorruptArtifactError(f"{index} points outside its directory: {shard}")
            sd.update(read_safetensors(shard_path))
        return sd
    bin_path = d / "pytorch_model.bin"
    if bin_path.is_file():
        try:
            return torch.load(bin_path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise CorruptArtifactError(
                f"{bin_path} is not a readable weights file: {exc}"
            ) from None
    raise ModelNotFoundError(f"{d} has no model.safetensors (or index, or pytorch_model.bin)")
