"""GGUF files (read): llama-architecture files, every tensor dequantized to fp32 with the `gguf`
package (F32, F16, BF16, Q8_0, Q4_0, Q4_1 and the K-quants it knows), the tokenizer rebuilt from
the metadata (`tokenizer/gguf.py`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import CorruptArtifactError, LmforgeError
from lmforge.model.formats.hf import LoadedModel, empty_model, load_state
from lmforge.model.formats.tensors import hf_to_ours
from lmforge.model.transformer import ModelConfig

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# GGUF

# GGUF block tensor → HF Llama name (then fused by `llama_to_ours`).
_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs → HF's rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf_metadata(reader: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = fld.contents()
        except Exception:  # an unknown value type: skip the field, not the file
            log.debug("skipping unreadable GGUF field %s", key)
    return meta


def open_gguf(path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:
        raise CorruptArtifactError(f"{path} is not a readable GGUF file: {exc}") from None


def gguf_config(meta: dict[str, Any], has_output: bool, source: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise LmforgeError(f"{source}: GGUF architecture {arch!r} is not supported (llama is)")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise CorruptArtifactError(f"{source}: GGUF metadata lacks llama.{key}")
        return value

    n_head = int(get("attention.head_count"))
    d_model = int(get("embedding_length"))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    try:
        return ModelConfig(
            arch="llama",
            vocab_size=int(meta.get("llama.vocab_size") or len(tokens)),
            d_model=d_model,
            n_layer=int(get("block_count")),
            n_head=n_head,
            n_kv_head=int(get("attention.head_count_kv", n_head)),
            d_ff=int(get("feed_forward_length")),
            head_dim=int(get("attention.key_length", d_model // n_head)),
            max_seq_len=int(get("context_length", 2048)),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            tie_embeddings=not has_output,
        )
    except ValueError as exc:
        raise CorruptArtifactError(f"{source}: {exc}") from None


def load_gguf(path: Path) -> LoadedModel:
    import gguf
    from gguf.quants import dequantize

    from lmforge.tokenizer.gguf import tokenizer_from_gguf_fields

    reader = open_gguf(path)
    meta = read_gguf_metadata(reader)
    names = {t.name for t in reader.tensors}
    config = gguf_config(meta, "output.weight" in names, str(path))
    tokenizer = tokenizer_from_gguf_fields(meta, str(path))
    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        try:
            arr = dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError) as exc:
            kind = gguf.GGMLQuantizationType(t.tensor_type).name
            raise CorruptArtifactError(
                f"{path}: cannot dequantize {t.name} ({kind}): {exc}"
            ) from None
        shape = tuple(int(x) for x in reversed(t.shape))
        arr = np.asarray(arr, dtype=np.float32).reshape(shape)
        if t.name in _GGUF_TOP:
            ours = _GGUF_TOP[t.name]
        elif t.name.startswith("blk."):
            _, idx, kind_, suffix = t.name.split(".", 3)
            if kind_ not in _GGUF_LAYER:
                raise CorruptArtifactError(f"{path}: unexpected tensor {t.name}")
            if kind_ == "attn_q":
                arr = unpermute_rope(arr, config.n_head)
            elif kind_ == "attn_k":
                arr = unpermute_rope(arr, config.n_kv_head)
            ours = f"model.layers.{idx}.{_GGUF_LAYER[kind_]}.{suffix}"
        elif t.name == "rope_freqs.weight":
            raise LmforgeError(f"{path}: RoPE frequency factors are not supported yet")
        else:
            raise CorruptArtifactError(f"{path}: unexpected tensor {t.name}")
        sd[ours] = torch.from_numpy(arr.copy())
    model = empty_model(config)
    load_state(model, hf_to_ours(sd, config), str(path))
    gen = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
    }
    lineage = {"source": {"kind": "gguf", "path": str(path), "name": meta.get("general.name")}}
    return LoadedModel(model, tokenizer, path, gen, lineage)
