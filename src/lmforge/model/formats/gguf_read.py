"""GGUF files (read): llama.cpp's llama, qwen2, qwen3, gemma2, gemma3 and phi3 architectures.

Each family's layout — tensor names, Q/K row order, Gemma's stored norm weights, metadata keys —
is `Family.gguf` (`gguf_layout.py`); this file streams the tensors through it: every tensor
dequantized to fp32 with the `gguf` package (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, the K-quants
Q2_K…Q6_K, the IQ types, TQ1_0/TQ2_0, MXFP4: whatever `gguf.quants.dequantize` knows), renamed,
Llama's Q/K rows put back in rotate-half order, Gemma's norms less 1, Q/K/V and gate/up fused.
The tokenizer is rebuilt from the metadata (`tokenizer/gguf.py`). What lmforge cannot run
(another architecture, experts, LongRoPE factors, …) is a one-line error naming it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import CorruptArtifactError, LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.formats.families import family_for_gguf_arch
from lmforge.model.formats.gguf_file import GGUFFile, GGUFTensor
from lmforge.model.formats.gguf_layout import ROPE_ROWS, TOP, GGUFLayout, config_from_gguf
from lmforge.model.formats.hf import LoadedModel, empty_model, load_state
from lmforge.model.formats.tensors import LAYERS, fuse_layers

log = logging.getLogger(__name__)


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs → HF's rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: Path) -> GGUFFile:
    return GGUFFile(path)


def gguf_config(file: GGUFFile, source: str) -> tuple[ModelConfig, GGUFLayout]:
    """The ModelConfig of an open GGUF file, and its family's layout."""
    meta = file.metadata
    family = family_for_gguf_arch(meta.get("general.architecture"), source)
    assert family.gguf is not None
    shapes = {t.name: t.shape for t in file.tensors}
    rope_freqs = None
    for t in file.tensors:
        if t.name == "rope_freqs.weight":
            rope_freqs = _dequantize(t, source)
    config = config_from_gguf(family.name, family.gguf, meta, shapes, rope_freqs, source)
    return config, family.gguf


def _dequantize(t: GGUFTensor, source: str) -> np.ndarray:
    import gguf
    from gguf.quants import dequantize

    try:
        arr = dequantize(t.data, t.tensor_type)
    except (NotImplementedError, ValueError) as exc:
        kind = gguf.GGMLQuantizationType(t.tensor_type).name
        raise CorruptArtifactError(
            f"{source}: cannot dequantize {t.name} ({kind}): {exc}"
        ) from None
    return np.asarray(arr, dtype=np.float32).reshape(t.shape)


def our_name(name: str, layout: GGUFLayout, source: str) -> str:
    """GGUF tensor NAME → ours (Q/K/V and gate/up as their pieces where the file splits them)."""
    base, _, kind = name.rpartition(".")
    if base in TOP:
        return f"{TOP[base]}.{kind}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in layout.tensors:
        return f"{LAYERS}{parts[1]}.{layout.tensors[parts[2]]}.{kind}"
    if base.endswith(("rope_factors_long", "rope_factors_short")):
        raise LmforgeError(f"{source}: LongRoPE factors ({name}) are not supported")
    raise CorruptArtifactError(f"{source}: unexpected tensor {name} for {layout.arch}")


def load_gguf(path: Path) -> LoadedModel:
    from lmforge.tokenizer.gguf import tokenizer_from_gguf_fields

    source = str(path)
    file = open_gguf(path)
    meta = file.metadata
    config, layout = gguf_config(file, source)
    tokenizer = tokenizer_from_gguf_fields(meta, source)
    heads = {module: getattr(config, count) for module, count in ROPE_ROWS.items()}
    sd: dict[str, torch.Tensor] = {}
    for t in file.tensors:
        if t.name == "rope_freqs.weight":  # read into config.rope_scaling
            continue
        ours = our_name(t.name, layout, source)
        arr = _dequantize(t, source)
        module = ours.rsplit(".", 1)[0].removeprefix(LAYERS).split(".", 1)[-1]
        if layout.interleaved_rope and module in heads:
            arr = unpermute_rope(arr, heads[module])
        if layout.norm_shift and t.name.endswith("norm.weight"):
            arr = arr - np.float32(layout.norm_shift)  # exact: 1 + w back to w (Sterbenz)
        # a copy only where the array is the file's own (read-only, memory-mapped) F32 data
        sd[ours] = torch.from_numpy(np.require(arr, np.float32, ("C", "W")))
    model = empty_model(config)
    load_state(model, fuse_layers(sd, config.n_layer), source)
    gen = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
    }
    lineage = {"source": {"kind": "gguf", "path": source, "name": meta.get("general.name")}}
    return LoadedModel(model, tokenizer, path, gen, lineage)
