"""GGUF export: an lmforge model as a llama.cpp GGUF file — llama, mistral (as llama.cpp's
llama, without sliding-window layers), qwen2, qwen3, gemma2, gemma3, olmo2, phi3, smollm3.

The inverse of `gguf_read.load_gguf`, through the same per-family layout (`Family.gguf`,
`gguf_layout.py`), laid out the way llama.cpp's convert_hf_to_gguf.py writes the family's
Hugging Face checkpoint: its architecture name, metadata keys and tensor names, Llama's Q/K rows
permuted into llama.cpp's interleaved-RoPE order, Gemma's norm weights stored as 1 + w, our
fused `qkv_proj` / `gate_up_proj` split into attn_q/k/v and ffn_gate/up (Phi-3 keeps them fused,
as its converter does), Llama 3 RoPE scaling as a `rope_freqs` tensor, the LM head left out
when tied. File types: F32 (exact), F16, BF16 and Q8_0 (`gguf.quants.quantize`); 1-D tensors (norms,
biases, rope_freqs) stay F32 in every type, as the converter keeps them, and a matrix whose rows
are not a whole number of Q8_0 blocks falls back to F16, as the converter does. The tokenizer's
metadata comes from `tokenizer/gguf.py` (`gguf_vocab`).

It writes nothing but the GGUF file (atomically: temp file, fsync, rename). Refused with one
line: GPT-2 (no GGUF layout: export it with `--format hf` and llama.cpp's own converter), the
LSTM, and any feature the family's llama.cpp architecture would run differently
(`gguf_layout.check_gguf_writable`).

    from lmforge.model.formats.gguf_write import export_gguf
    export_gguf(load_model("my-model-dir"), Path("my-model.Q8_0.gguf"), "q8_0")
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from torch import nn

from lmforge.atomic import write_with
from lmforge.errors import LmforgeError
from lmforge.model.formats.families import FAMILIES, check_saveable, gguf_exportable
from lmforge.model.formats.gguf_layout import (
    KEY_TYPES,
    ROPE_ROWS,
    TOP,
    GGUFLayout,
    check_gguf_writable,
    gguf_metadata,
    llama3_rope_factors,
)
from lmforge.model.formats.hf import LoadedModel
from lmforge.model.formats.tensors import LAYERS, piece_of
from lmforge.model.heads import HeadModel
from lmforge.model.transformer import Transformer
from lmforge.tokenizer.gguf import GGUFVocab, gguf_vocab

log = logging.getLogger(__name__)

GGUFType = Literal["f32", "f16", "bf16", "q8_0"]
GGUF_TYPES: dict[str, Q] = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
_FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
# Module types a plain float model is made of; anything else (LoRA, quantized layers) is not.
_PLAIN_MODULES = (
    "torch.nn.",
    "lmforge.model.transformer",
    "lmforge.model.heads",
    "lmforge.model.lstm",
)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: its GGUF name, shape (numpy order: [rows, cols]), stored type,
    and a function that makes its fp32 data, so that one tensor at a time is converted."""

    name: str
    shape: tuple[int, ...]
    qtype: Q
    data: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(gguf.quants.quant_shape_to_byte_shape(self.shape, self.qtype)))


def check_exportable(model: nn.Module, source: str) -> None:
    """Refuse (one line) a model that is not made of plain float layers: LoRA-wrapped or
    quantized layers have no GGUF/HF float layout to write."""
    for name, module in model.named_modules():
        kind = type(module)
        if not kind.__module__.startswith(_PLAIN_MODULES):
            where = name or "the model"
            raise LmforgeError(
                f"{source}: {where} is not a plain float layer ({kind.__name__}); export the "
                "unquantized model (a LoRA one merged)"
            )
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            raise LmforgeError(
                f"{source}: weight {name} is {str(tensor.dtype).removeprefix('torch.')}, not "
                "float; export the unquantized model"
            )


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half Q/K rows → llama.cpp's interleaved pairs (convert_hf_to_gguf.py
    `LlamaModel.permute`); `gguf_read.unpermute_rope` is its inverse."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: Transformer, dtype: GGUFType) -> list[GGUFTensor]:
    """MODEL's tensors under llama.cpp's names, in the converter's order (rope_freqs,
    embeddings, blocks, final norm, LM head), each with the type it is stored as for file type
    DTYPE."""
    cfg = model.config
    layout = _layout(cfg.arch)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    heads = {module: getattr(cfg, count) for module, count in ROPE_ROWS.items()}
    want = GGUF_TYPES[dtype]
    out: list[GGUFTensor] = []

    def add(name: str, t: torch.Tensor, permute_heads: int = 0) -> None:
        shift = layout.norm_shift if name.endswith("norm.weight") else 0.0

        def data() -> np.ndarray:
            arr = t.to(torch.float32).contiguous().numpy()
            if permute_heads:
                arr = permute_rope(arr, permute_heads)
            return arr + np.float32(shift) if shift else arr

        qtype = want if t.ndim == 2 else Q.F32  # norms, biases (1-D) stay F32, as in llama.cpp
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if t.shape[-1] % block:  # as the converter does on a QuantError
            log.info("%s: %d columns are not whole %s blocks: F16", name, t.shape[-1], qtype.name)
            qtype = Q.F16
        out.append(GGUFTensor(name, tuple(t.shape), qtype, data))

    if cfg.rope_scaling is not None and cfg.rope_scaling.get("type") == "llama3":
        factors = llama3_rope_factors(cfg.rope_scaling, cfg.rotary_dim, float(cfg.rope_theta or 0))
        add("rope_freqs.weight", torch.from_numpy(factors))
    add("token_embd.weight", sd[f"{TOP['token_embd']}.weight"])
    for i in range(cfg.n_layer):
        for name, ours in layout.tensors.items():
            for kind in ("weight", "bias"):
                t = piece_of(sd, f"{LAYERS}{i}.{ours}.{kind}", cfg)
                if t is not None:
                    permute = heads.get(ours, 0) if layout.interleaved_rope else 0
                    add(f"blk.{i}.{name}.{kind}", t, permute)
    add("output_norm.weight", sd[f"{TOP['output_norm']}.weight"])
    if not cfg.tie_embeddings:
        add("output.weight", sd[f"{TOP['output']}.weight"])
    return out


def _layout(arch: str) -> GGUFLayout:
    layout = FAMILIES[arch].gguf
    if layout is None:
        raise LmforgeError(f"{arch} has no GGUF layout")
    return layout


def export_gguf(
    loaded: LoadedModel, path: Path, dtype: GGUFType = "f32", *, name: str | None = None
) -> Path:
    """Write LOADED as a GGUF file of its family's llama.cpp architecture at PATH (atomically);
    returns PATH.

    DTYPE: "f32" (bit-exact), "f16", "bf16" or "q8_0" for the matrices; norms are F32 in all.
    NAME is `general.name` (default: the lineage's name, else the source's file name).
    """
    source = str(loaded.path)
    if dtype not in GGUF_TYPES:
        raise LmforgeError(f"unknown GGUF type {dtype!r} ({', '.join(GGUF_TYPES)})")
    model = loaded.model
    if isinstance(model, HeadModel):
        raise LmforgeError(f"{source} is a {model.head.task} model; GGUF holds language models")
    if not isinstance(model, Transformer):
        raise LmforgeError(f"{source}: GGUF export supports Transformers, not the LSTM baseline")
    cfg = model.config
    layout = FAMILIES[cfg.arch].gguf
    if layout is None:
        raise LmforgeError(
            f"{source}: GGUF export supports {', '.join(gguf_exportable())}, not {cfg.arch!r}; "
            "use --format hf and llama.cpp's convert_hf_to_gguf.py"
        )
    try:
        check_saveable(cfg)  # what its Hugging Face class (the converter's input) cannot say
    except LmforgeError as exc:
        raise LmforgeError(f"{source}: {exc}") from None
    check_gguf_writable(cfg, layout, source)
    check_exportable(model, source)
    vocab = gguf_vocab(loaded.tokenizer, model.config.vocab_size, source)
    tensors = gguf_tensors(model, dtype)
    title = name or str(loaded.lineage.get("name") or Path(source).name.removesuffix(".gguf"))

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, layout.arch)
        try:
            _add_metadata(writer, model, layout, vocab, title, dtype)
            for t in tensors:
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, t.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in tensors:
                writer.write_tensor_data(gguf.quants.quantize(t.data(), t.qtype))
        finally:
            writer.close()

    write_with(path, write)
    log.info("wrote %s (%s, %d tensors)", path, dtype, len(tensors))
    return path


_VALUE_TYPES = {
    "uint32": gguf.GGUFValueType.UINT32,
    "float32": gguf.GGUFValueType.FLOAT32,
    "string": gguf.GGUFValueType.STRING,
}


def _add_metadata(
    writer: gguf.GGUFWriter,
    model: Transformer,
    layout: GGUFLayout,
    vocab: GGUFVocab,
    name: str,
    dtype: GGUFType,
) -> None:
    """The keys convert_hf_to_gguf.py writes for the family, in its order."""
    writer.add_type("model")
    writer.add_name(name)
    for key, value in gguf_metadata(model.config, layout).items():
        full = f"{layout.arch}.{key}"
        kind = KEY_TYPES[key]
        if kind == "bool array":
            writer.add_array(full, [bool(v) for v in value])
        else:
            writer.add_key_value(full, value, _VALUE_TYPES[kind])
        if key == "attention.layer_norm_rms_epsilon":
            writer.add_file_type(_FILE_TYPES[dtype])
    vocab.write_to(writer)  # the tokenizer keys, gpt2 (BPE) or llama (SentencePiece)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
