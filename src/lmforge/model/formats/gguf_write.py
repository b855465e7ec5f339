"""GGUF export: an lmforge Llama-style model as a llama.cpp `llama`-architecture GGUF file.

The inverse of `gguf_read.load_gguf`, laid out the way llama.cpp's convert_hf_to_gguf.py
(`LlamaModel`) writes a Hugging Face Llama: the same metadata keys, tensor names and types, Q/K
rows permuted into llama.cpp's interleaved-RoPE order, our fused `qkv_proj` / `gate_up_proj`
split into attn_q/k/v and ffn_gate/up, the LM head left out when tied. File types: F32 (exact),
F16 and Q8_0 (`gguf.quants.quantize`); norm weights stay F32 in every type, as llama.cpp keeps
them, and a matrix whose rows are not a whole number of Q8_0 blocks falls back to F16, as the
converter does. The tokenizer's metadata comes from `tokenizer/gguf.py` (`gguf_vocab`).

It writes nothing but the GGUF file (atomically: temp file, fsync, rename). GPT-2-style models
and the LSTM are refused: llama.cpp's `gpt2` architecture is another tensor layout that lmforge
cannot read back to test; export them with `--format hf` and llama.cpp's own converter.

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
from lmforge.model.formats.hf import LoadedModel
from lmforge.model.heads import HeadModel
from lmforge.model.transformer import Transformer
from lmforge.tokenizer.gguf import GGUFVocab, gguf_vocab

log = logging.getLogger(__name__)

GGUFType = Literal["f32", "f16", "q8_0"]
GGUF_TYPES: dict[str, Q] = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}
_FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
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
    """MODEL's tensors under llama.cpp's names, in the converter's order (embeddings, blocks,
    final norm, LM head), each with the type it is stored as for file type DTYPE."""
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    qd, kvd = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    want = GGUF_TYPES[dtype]
    out: list[GGUFTensor] = []

    def add(name: str, t: torch.Tensor, permute_heads: int = 0) -> None:
        def data() -> np.ndarray:
            arr = t.to(torch.float32).contiguous().numpy()
            return permute_rope(arr, permute_heads) if permute_heads else arr

        qtype = want if t.ndim == 2 else Q.F32  # norms (1-D) stay F32, as in llama.cpp
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if t.shape[-1] % block:  # as the converter does on a QuantError
            log.info("%s: %d columns are not whole %s blocks: F16", name, t.shape[-1], qtype.name)
            qtype = Q.F16
        out.append(GGUFTensor(name, tuple(t.shape), qtype, data))

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.n_layer):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        q, k, v = sd[p + "self_attn.qkv_proj.weight"].split((qd, kvd, kvd))
        gate, up = sd[p + "mlp.gate_up_proj.weight"].split((cfg.d_ff, cfg.d_ff))
        add(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        add(b + "attn_q.weight", q, cfg.n_head)
        add(b + "attn_k.weight", k, cfg.n_kv_head)
        add(b + "attn_v.weight", v)
        add(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        add(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        add(b + "ffn_gate.weight", gate)
        add(b + "ffn_up.weight", up)
        add(b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_embeddings:
        add("output.weight", sd["lm_head.weight"])
    return out


def export_gguf(
    loaded: LoadedModel, path: Path, dtype: GGUFType = "f32", *, name: str | None = None
) -> Path:
    """Write LOADED as a llama-architecture GGUF file at PATH (atomically); returns PATH.

    DTYPE: "f32" (bit-exact), "f16" or "q8_0" for the matrices; norms are F32 in all three.
    NAME is `general.name` (default: the lineage's name, else the source's file name).
    """
    source = str(loaded.path)
    if dtype not in GGUF_TYPES:
        raise LmforgeError(f"unknown GGUF type {dtype!r} (f32, f16, q8_0)")
    model = loaded.model
    if isinstance(model, HeadModel):
        raise LmforgeError(f"{source} is a {model.head.task} model; GGUF holds language models")
    if not isinstance(model, Transformer):
        raise LmforgeError(f"{source}: GGUF export supports Transformers, not the LSTM baseline")
    if model.config.arch != "llama":
        raise LmforgeError(
            f"{source}: GGUF export supports Llama-style models, not {model.config.arch!r}; "
            "use --format hf and llama.cpp's convert_hf_to_gguf.py"
        )
    check_exportable(model, source)
    vocab = gguf_vocab(loaded.tokenizer, model.config.vocab_size, source)
    tensors = gguf_tensors(model, dtype)
    title = name or str(loaded.lineage.get("name") or Path(source).name.removesuffix(".gguf"))

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, "llama")
        try:
            _add_metadata(writer, model, vocab, title, dtype)
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


def _add_metadata(
    writer: gguf.GGUFWriter, model: Transformer, vocab: GGUFVocab, name: str, dtype: GGUFType
) -> None:
    """The keys convert_hf_to_gguf.py writes for a Llama, in its order."""
    cfg = model.config
    writer.add_type("model")
    writer.add_name(name)
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_rope_freq_base(float(cfg.rope_theta or 0))
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_file_type(_FILE_TYPES[dtype])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.d_model // cfg.n_head:  # llama.cpp assumes d_model / n_head otherwise
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_add_space_prefix(False)
    writer.add_add_bos_token(vocab.add_bos)  # always written: llama.cpp's default differs by pre
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for key, tid in (
        ("bos", vocab.bos_id),
        ("eos", vocab.eos_id),
        ("unk", vocab.unk_id),
        ("pad", vocab.pad_id),
    ):
        if tid is not None:
            getattr(writer, f"add_{key}_token_id")(tid)
    writer.add_chat_template(vocab.chat_template)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
