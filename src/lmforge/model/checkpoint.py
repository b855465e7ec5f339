"""Model files: the only code that knows checkpoint formats.

- Hugging Face layout (read and write): `config.json` (`LlamaForCausalLM` or `GPT2LMHeadModel`),
  `model.safetensors` (metadata `format: pt`; sharded `model.safetensors.index.json` and
  `pytorch_model.bin` are read too, the latter with `torch.load(weights_only=True)`),
  `tokenizer.json`, `tokenizer_config.json` (with `chat_template`), `generation_config.json`,
  and lmforge's own `lmforge.json` (lineage). A directory written here loads in
  `transformers.AutoModelForCausalLM.from_pretrained(dir)` unchanged.
- GGUF (read): llama-architecture files, every tensor dequantized to fp32 with the `gguf`
  package (F32, F16, BF16, Q8_0, Q4_0, Q4_1 and the K-quants it knows), the tokenizer rebuilt
  from the metadata (`tokenizer/gguf.py`).
- lmforge's LSTM baseline (read and write): the same directory layout, with `config.json`
  naming `LmforgeLSTMForCausalLM` (`model_type: lmforge-lstm`, the `LSTMConfig` under
  `lmforge_config`) and the weights under torch's own `nn.LSTM` names. `transformers` cannot
  load it (it has no LSTM language model); lmforge's `load_model` can.
- Quantized models (`model/quant.py`; read and write): the same layout and tensor names, with
  `config.json`'s `quantization_config` (`quant_method: lmforge`, `method` int8 or int4, `bits`,
  `group_size`, `head` int8/int4/float, `weight_layout`) and, for each quantized layer,
  `<layer>.qweight`
  (int8 [out, in], or uint8 [out, in/2] holding two int4 values per byte, the even input in the
  low nibble), `<layer>.scales` (fp32 [out] or [out, in/group]) and for int4 `<layer>.zeros`
  (fp32 [out, in/group]) in place of `<layer>.weight`; w = qweight · scales (int8) or
  (q − 8) · scales + zeros (int4). A quantized head is stored as `lm_head.*` even when the float
  head is tied to the embeddings. Only lmforge loads these back.

Every write is atomic; nothing is ever pickled. The module is longer than ~600 lines on purpose:
it is the one place that knows formats (config mapping, tensor-name maps for Llama, GPT-2 and
GGUF, safetensors reading, GGUF dequantization), so that no other module has to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.atomic import write_text_atomic, write_with
from lmforge.errors import CorruptArtifactError, LmforgeError, ModelNotFoundError
from lmforge.model.heads import HeadConfig, HeadModel, head_model
from lmforge.model.lora import LoraConfig, apply_lora, load_lora_state, lora_state_dict
from lmforge.model.lstm import LSTMConfig, LSTMLanguageModel
from lmforge.model.quant import QuantConfig, QuantLinear, quantization_of, quantize_model
from lmforge.model.transformer import ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

LINEAGE_FILE = "lmforge.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class LoadedModel:
    """A model with everything needed to use it."""

    model: Transformer | LSTMLanguageModel
    tokenizer: Tokenizer
    path: Path
    generation_config: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig | LSTMConfig:
        return self.model.config

    def stop_token_ids(self) -> list[int]:
        """Token ids that end generation: generation_config's eos ids and the tokenizer's eos."""
        ids = self.generation_config.get("eos_token_id")
        out = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_id is not None and self.tokenizer.eos_id not in out:
            out.append(self.tokenizer.eos_id)
        return out


def empty_model(config: ModelConfig | LSTMConfig) -> Transformer | LSTMLanguageModel:
    """A model on the meta device (no memory, no init), to be filled by `load_state`.

    torch's own layer constructors initialise their weights even on the meta device, and the
    first such call costs ~2 s (meta kernels load lazily), so initialisation is switched off.
    """
    layers: tuple[Any, ...] = (
        torch.nn.Linear,
        torch.nn.Embedding,
        torch.nn.LayerNorm,
        torch.nn.RNNBase,
    )
    saved = [cls.reset_parameters for cls in layers]
    try:
        for cls in layers:
            cls.reset_parameters = lambda self: None
        with torch.device("meta"):
            if isinstance(config, LSTMConfig):
                return LSTMLanguageModel(config)
            return Transformer(config)
    finally:
        for cls, fn in zip(layers, saved, strict=True):
            cls.reset_parameters = fn


# ---------------------------------------------------------------------------------------------
# Hugging Face config.json ↔ ModelConfig


LSTM_ARCHITECTURE = "LmforgeLSTMForCausalLM"
LSTM_MODEL_TYPE = "lmforge-lstm"


def config_to_hf(
    config: ModelConfig | LSTMConfig, tokenizer: Tokenizer | None = None
) -> dict[str, Any]:
    ids: dict[str, Any] = {}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
        ids["pad_token_id"] = tokenizer.pad_id
    if isinstance(config, LSTMConfig):
        # HF-style names for people and tools that read config.json; `lmforge_config` (added
        # by `save_model`) is what `config_from_hf` reads back.
        return {
            "architectures": [LSTM_ARCHITECTURE],
            "model_type": LSTM_MODEL_TYPE,
            "vocab_size": config.vocab_size,
            "hidden_size": config.d_model,
            "num_hidden_layers": config.n_layer,
            "max_position_embeddings": config.max_seq_len,
            "dropout": config.dropout,
            "initializer_range": config.init_std,
            "tie_word_embeddings": config.tie_embeddings,
            "torch_dtype": "float32",
            **ids,
        }
    if config.arch == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": config.vocab_size,
            "n_positions": config.max_seq_len,
            "n_embd": config.d_model,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": config.d_ff,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": config.norm_eps,
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": 0.0,
            "initializer_range": config.init_std,
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
            **ids,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": config.init_std,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": "float32",
        **ids,
    }


def config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig | LSTMConfig:
    model_type = hf.get("model_type")
    try:
        if model_type == LSTM_MODEL_TYPE:
            lmforge_config = hf.get("lmforge_config")
            if not isinstance(lmforge_config, dict):
                raise CorruptArtifactError(f"{source}: config.json lacks lmforge_config")
            return LSTMConfig.from_dict(lmforge_config)
        if model_type == "gpt2":
            act = hf.get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
                raise LmforgeError(f"{source}: GPT-2 activation {act!r} is not supported")
            return ModelConfig(
                arch="gpt2",
                vocab_size=hf["vocab_size"],
                d_model=hf["n_embd"],
                n_layer=hf["n_layer"],
                n_head=hf["n_head"],
                d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
                max_seq_len=hf["n_positions"],
                norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=True,
                init_std=hf.get("initializer_range", 0.02),
            )
        if model_type in ("llama", "mistral"):
            if hf.get("hidden_act", "silu") != "silu":
                raise LmforgeError(f"{source}: activation {hf['hidden_act']!r} is not supported")
            if hf.get("attention_bias") or hf.get("mlp_bias"):
                raise LmforgeError(f"{source}: attention/MLP biases are not supported for llama")
            rope = hf.get("rope_parameters") or {}
            scaling = hf.get("rope_scaling") or {}
            rope_type = scaling.get("rope_type") or rope.get("rope_type") or "default"
            if rope_type != "default":
                raise LmforgeError(f"{source}: RoPE scaling {rope_type!r} is not supported yet")
            if model_type == "mistral" and hf.get("sliding_window"):
                raise LmforgeError(f"{source}: sliding-window attention is not supported")
            n_head = hf["num_attention_heads"]
            return ModelConfig(
                arch="llama",
                vocab_size=hf["vocab_size"],
                d_model=hf["hidden_size"],
                n_layer=hf["num_hidden_layers"],
                n_head=n_head,
                n_kv_head=hf.get("num_key_value_heads") or n_head,
                d_ff=hf["intermediate_size"],
                head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
                max_seq_len=hf.get("max_position_embeddings", 2048),
                norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=hf.get("rope_theta") or rope.get("rope_theta") or 10000.0,
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                init_std=hf.get("initializer_range", 0.02),
            )
    except KeyError as exc:
        raise CorruptArtifactError(f"{source}: config.json lacks {exc}") from None
    except ValueError as exc:
        raise CorruptArtifactError(f"{source}: {exc}") from None
    raise LmforgeError(
        f"{source}: model_type {model_type!r} is not supported "
        f"(llama, mistral, gpt2, {LSTM_MODEL_TYPE} are)"
    )


# ---------------------------------------------------------------------------------------------
# State-dict name maps. Our names are HF Llama's; GPT-2 needs renaming and Conv1D transposes.

_GPT2_LAYER = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_1.bias": "input_layernorm.bias",
    "ln_2.weight": "post_attention_layernorm.weight",
    "ln_2.bias": "post_attention_layernorm.bias",
    "attn.c_attn.weight": "self_attn.qkv_proj.weight",
    "attn.c_attn.bias": "self_attn.qkv_proj.bias",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "attn.c_proj.bias": "self_attn.o_proj.bias",
    "mlp.c_fc.weight": "mlp.up_proj.weight",
    "mlp.c_fc.bias": "mlp.up_proj.bias",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
    "mlp.c_proj.bias": "mlp.down_proj.bias",
}
# A quantized layer's tensors keep its module path: c_attn.qweight ↔ qkv_proj.qweight, ….
_QUANT_TENSORS = ("qweight", "scales", "zeros")
_GPT2_LAYER.update(
    {
        f"{theirs.removesuffix('.weight')}.{t}": f"{ours.removesuffix('.weight')}.{t}"
        for theirs, ours in list(_GPT2_LAYER.items())
        if theirs.endswith("weight") and not theirs.startswith("ln_")
        for t in _QUANT_TENSORS
    }
)
_GPT2_TOP = {
    "wte.weight": "model.embed_tokens.weight",
    "wpe.weight": "model.embed_positions.weight",
    "ln_f.weight": "model.norm.weight",
    "ln_f.bias": "model.norm.bias",
}
# Fused layers of ours ← the separate ones of HF Llama, concatenated along the output rows;
# that holds for every tensor with one row per output: a weight, a quantized layer's tensors.
_LLAMA_FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
_ROW_TENSORS = ("weight", *_QUANT_TENSORS)


def _is_conv1d(hf_name: str) -> bool:
    """GPT-2's Conv1D weights are stored [in, out], the transpose of a Linear's."""
    return hf_name.endswith(".weight") and hf_name.split(".")[-2] in ("c_attn", "c_proj", "c_fc")


def gpt2_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        name = name.removeprefix("transformer.")
        if name in _GPT2_TOP:
            out[_GPT2_TOP[name]] = t
        elif name.startswith("h."):
            _, idx, rest = name.split(".", 2)
            if rest in _GPT2_LAYER:
                value = t.t().contiguous() if _is_conv1d(rest) else t
                out[f"model.layers.{idx}.{_GPT2_LAYER[rest]}"] = value
            # attn.bias / attn.masked_bias are causal-mask buffers, not weights.
        elif name.startswith("lm_head.") and name != "lm_head.weight":
            out[name] = t  # a quantized head (the float lm_head.weight is tied to wte)
    return out


def ours_to_gpt2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    top = {v: k for k, v in _GPT2_TOP.items()}
    layer = {v: k for k, v in _GPT2_LAYER.items()}
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name in top:
            out[f"transformer.{top[name]}"] = t.contiguous()
        elif name.startswith("model.layers."):
            idx, rest = name.removeprefix("model.layers.").split(".", 1)
            theirs = layer[rest]
            out[f"transformer.h.{idx}.{theirs}"] = (t.t() if _is_conv1d(theirs) else t).contiguous()
        elif name.startswith("lm_head."):
            out[name] = t.contiguous()  # a quantized head
    return out


def llama_to_ours(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Fuse HF Llama's separate Q/K/V and gate/up tensors, in place (each original is released
    as soon as its fused copy exists, so loading peaks at one layer above the model's size)."""
    out = sd
    for i in range(config.n_layer):
        p = f"model.layers.{i}."
        for fused, parts in _LLAMA_FUSED.items():
            for t in _ROW_TENSORS:
                names = [f"{p}{x}.{t}" for x in parts]
                if all(n in out for n in names):
                    out[f"{p}{fused}.{t}"] = torch.cat([out.pop(n) for n in names], dim=0)
    return out


def ours_to_llama(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    qd, kvd = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    sizes = {
        "self_attn.qkv_proj": (qd, kvd, kvd),
        "mlp.gate_up_proj": (config.d_ff, config.d_ff),
    }
    for name, t in sd.items():
        rest = name.split(".", 3)[-1] if name.startswith("model.layers.") else ""
        module, _, kind = rest.rpartition(".")
        if module in _LLAMA_FUSED and kind in _ROW_TENSORS:
            prefix = name[: -len(rest)]
            for part, piece in zip(_LLAMA_FUSED[module], t.split(sizes[module]), strict=True):
                out[f"{prefix}{part}.{kind}"] = piece.contiguous()
        else:
            out[name] = t.contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# Save


def state_dict_for_hf(model: Transformer | LSTMLanguageModel) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names (the LSTM's: torch's names), contiguous,
    tied copies dropped."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    if isinstance(model, LSTMLanguageModel):
        return {k: v.contiguous() for k, v in sd.items()}
    if model.config.arch == "gpt2":
        return ours_to_gpt2(sd)
    return ours_to_llama(sd, model.config)


def save_model(
    model: Transformer | LSTMLanguageModel | HeadModel,
    tokenizer: Tokenizer,
    directory: str | Path,
    *,
    lineage: dict[str, Any] | None = None,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """Write MODEL and TOKENIZER to DIRECTORY in the Hugging Face layout (+ lmforge.json).

    An `LSTMLanguageModel` is written in the same layout, but only lmforge loads it back.
    """
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(model, HeadModel):
        tensors, hf = head_state_dict_for_hf(model), head_config_to_hf(model, tokenizer)
    else:
        tensors, hf = state_dict_for_hf(model), config_to_hf(model.config, tokenizer)
    write_with(
        d / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"})
    )
    hf["lmforge_config"] = model.config.to_dict()
    quant = quantization_of(model)
    if quant is not None:
        hf["quantization_config"] = quant_config_to_hf(quant)
    write_text_atomic(d / "config.json", json.dumps(hf, indent=2))
    gen = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    gen["pad_token_id"] = tokenizer.pad_id
    gen.update(generation_config or {})
    write_text_atomic(d / "generation_config.json", json.dumps(gen, indent=2))
    tokenizer.save(d)
    record = {"format_version": 1, "weights_sha256": file_sha256(d / WEIGHTS_FILE)}
    record.update(lineage or {})
    write_text_atomic(d / LINEAGE_FILE, json.dumps(record, indent=2, default=str))
    return d


QUANT_METHOD = "lmforge"  # config.json's quantization_config.quant_method for model/quant.py
_WEIGHT_LAYOUT = {
    "int8": "qweight int8 [out, in], scales float32 [out]: w = qweight * scales",
    "int4": "qweight uint8 [out, in/2], input 2j in the low nibble, 2j+1 in the high; scales, "
    "zeros float32 [out, in/group_size]: w = (q - 8) * scales + zeros",
}


def quant_config_to_hf(config: QuantConfig) -> dict[str, Any]:
    methods = dict.fromkeys((config.method, config.head))  # in order, once each
    layout = {m: _WEIGHT_LAYOUT[m] for m in methods if m in _WEIGHT_LAYOUT}
    return {
        "quant_method": QUANT_METHOD,
        "method": config.method,
        "bits": config.bits,
        "group_size": config.group_size,
        "head": config.head,
        "modules": f"every linear layer of the blocks: {config.method}; lm_head: {config.head}",
        "weight_layout": layout,
    }


def quant_config_from_hf(hf: dict[str, Any], source: str) -> QuantConfig | None:
    """The quantization a config.json describes (None: a float model)."""
    qc = hf.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CorruptArtifactError(f"{source}: config.json's quantization_config is not an object")
    if qc.get("quant_method") != QUANT_METHOD:
        raise LmforgeError(
            f"{source}: {qc.get('quant_method')!r} quantization is not supported "
            "(lmforge reads its own int8/int4 models: lmforge quantize)"
        )
    try:
        return QuantConfig(
            method=str(qc["method"]),
            group_size=qc.get("group_size"),
            head=str(qc["head"]),
        )
    except KeyError as exc:
        raise CorruptArtifactError(f"{source}: quantization_config lacks {exc}") from None
    except LmforgeError as exc:
        raise CorruptArtifactError(f"{source}: quantization_config: {exc}") from None


# Head models: HF's *ForSequenceClassification (`score`, no bias) and *ForQuestionAnswering
# (`qa_outputs`); the decoder's weights under the prefix HF's class keeps them under.
_HEAD_ARCHITECTURES = {
    ("llama", "classify"): ("LlamaForSequenceClassification", "model."),
    ("llama", "qa"): ("LlamaForQuestionAnswering", "transformer."),  # HF's prefix for BC
    ("gpt2", "classify"): ("GPT2ForSequenceClassification", "transformer."),
    ("gpt2", "qa"): ("GPT2ForQuestionAnswering", "transformer."),
}
_HEAD_WEIGHTS = ("score.", "qa_outputs.")


def head_config_to_hf(model: HeadModel, tokenizer: Tokenizer) -> dict[str, Any]:
    arch, _ = _HEAD_ARCHITECTURES[(model.config.arch, model.head.task)]
    hf = config_to_hf(model.config, tokenizer)
    hf["architectures"] = [arch]
    hf["tie_word_embeddings"] = False  # there is no LM head to tie
    if model.head.task == "classify":
        labels = model.head.labels
        hf["num_labels"] = len(labels)
        hf["id2label"] = {str(i): label for i, label in enumerate(labels)}
        hf["label2id"] = {label: i for i, label in enumerate(labels)}
    hf["lmforge_head"] = model.head.to_dict()
    return hf


def head_state_dict_for_hf(model: HeadModel) -> dict[str, torch.Tensor]:
    """The decoder's weights under the prefix of HF's head class, then the head's."""
    _, prefix = _HEAD_ARCHITECTURES[(model.config.arch, model.head.task)]
    body = {k: v.detach() for k, v in model.body.state_dict().items() if not k.startswith("rope_")}
    if model.config.arch == "gpt2":
        out = ours_to_gpt2(body)
    else:
        out = {
            prefix + k.removeprefix("model."): v
            for k, v in ours_to_llama(body, model.config).items()
        }
    for name, t in model.state_dict().items():
        if name.startswith(_HEAD_WEIGHTS):
            out[name] = t.detach().contiguous()
    return out


def head_config_from_hf(hf: dict[str, Any], source: str) -> HeadConfig | None:
    """The head a config.json describes (None: a causal LM)."""
    recorded = hf.get("lmforge_head")
    try:
        if isinstance(recorded, dict):
            return HeadConfig.from_dict(recorded)
        arch = (hf.get("architectures") or [""])[0]
        if arch.endswith("ForQuestionAnswering"):
            return HeadConfig("qa")
        if arch.endswith("ForSequenceClassification"):
            id2label = hf.get("id2label") or {}
            n = int(hf.get("num_labels") or len(id2label) or 2)
            return HeadConfig("classify", tuple(str(id2label.get(str(i), i)) for i in range(n)))
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptArtifactError(f"{source}: config.json has a bad head: {exc}") from None
    return None


def head_of(path: str | Path) -> HeadConfig | None:
    """The head a model directory's config.json describes; None for a language model, a file,
    or a config.json that cannot be read (loading the model says what is wrong with it)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        hf = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return head_config_from_hf(hf, str(path)) if isinstance(hf, dict) else None


def load_head_model(path: str | Path) -> tuple[HeadModel, Tokenizer, dict[str, Any]]:
    """A classification or QA model directory → (model in eval mode, tokenizer, lineage)."""
    d = Path(path)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ModelNotFoundError(f"{d} is not a model directory (no config.json)")
    hf = _read_json(cfg_path)
    head = head_config_from_hf(hf, str(d))
    if head is None:
        raise LmforgeError(f"{d} is a language model, not a classification or QA model")
    config = config_from_hf({**hf, "tie_word_embeddings": False}, str(d))
    if not isinstance(config, ModelConfig):
        raise LmforgeError(f"{d}: task heads need a Transformer, not an LSTM")
    _, prefix = _HEAD_ARCHITECTURES[(config.arch, head.task)]
    sd = read_hf_weights(d)
    heads = {k: sd.pop(k) for k in list(sd) if k.startswith(_HEAD_WEIGHTS)}
    if config.arch == "gpt2":
        body_sd = gpt2_to_ours(sd)
    else:
        renamed = {"model." + k.removeprefix(prefix): v for k, v in sd.items()}
        body_sd = llama_to_ours(renamed, config)
    body = empty_model(config)
    assert isinstance(body, Transformer)
    load_state(body, {**body_sd, "lm_head.weight": body_sd["model.embed_tokens.weight"]}, str(d))
    with torch.device("meta"):
        model = head_model(body, head)
    for name, tensor in heads.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        want = getattr(module, attr).shape
        if tuple(tensor.shape) != tuple(want):
            raise CorruptArtifactError(
                f"{d}: {name} has shape {tuple(tensor.shape)}, expected {tuple(want)}"
            )
        setattr(module, attr, torch.nn.Parameter(tensor.to(torch.float32)))
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise CorruptArtifactError(f"{d}: missing weights, e.g. {leftover[0]}")
    model.eval()
    return model, Tokenizer.load(d), read_lineage(d)


# LoRA adapters: a small directory that names its base model's directory.
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "lmforge-lora/1"


def save_adapter(
    model: nn.Module,
    tokenizer: Tokenizer,
    directory: str | Path,
    lora: LoraConfig,
    base_path: Path,
    lineage: dict[str, Any] | None = None,
) -> Path:
    """Write MODEL's LoRA adapters (and its task head, trained in full) to DIRECTORY."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = lora_state_dict(model)
    head = model.head if isinstance(model, HeadModel) else None
    if head is not None:
        tensors.update(
            {
                k: v.detach().contiguous()
                for k, v in model.state_dict().items()
                if k.startswith(_HEAD_WEIGHTS)
            }
        )
    write_with(
        d / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"})
    )
    config = {
        "format": ADAPTER_FORMAT,
        "base_model_name_or_path": str(base_path.resolve()),
        "base_weights_sha256": read_lineage(base_path).get("weights_sha256"),
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": list(lora.targets),
        "head": head.to_dict() if head is not None else None,
    }
    write_text_atomic(d / ADAPTER_CONFIG, json.dumps(config, indent=2))
    tokenizer.save(d)
    record = {
        "format_version": 1,
        "kind": "lora-adapter",
        "weights_sha256": file_sha256(d / ADAPTER_WEIGHTS),
    }
    record.update(lineage or {})
    write_text_atomic(d / LINEAGE_FILE, json.dumps(record, indent=2, default=str))
    return d


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter(path: str | Path) -> tuple[nn.Module, Tokenizer, dict[str, Any], LoraConfig]:
    """An adapter directory → (its base with the adapters applied, unmerged; tokenizer; lineage;
    the LoRA settings). The base must still be where the adapter says it is."""
    d = Path(path)
    cfg = _read_json(d / ADAPTER_CONFIG)
    if cfg.get("format") != ADAPTER_FORMAT:
        raise CorruptArtifactError(f"{d}: not an lmforge LoRA adapter ({ADAPTER_CONFIG})")
    base_path = Path(str(cfg.get("base_model_name_or_path")))
    if not base_path.is_dir():
        raise ModelNotFoundError(f"{d}: its base model {base_path} is gone")
    want = cfg.get("base_weights_sha256")
    have = read_lineage(base_path).get("weights_sha256")
    if want and have and want != have:
        raise CorruptArtifactError(f"{d}: the base model at {base_path} has changed since")
    try:
        lora = LoraConfig(
            rank=int(cfg["r"]),
            alpha=float(cfg["lora_alpha"]),
            targets=tuple(cfg["target_modules"]),
            dropout=float(cfg.get("lora_dropout", 0.0)),
        )
        head = HeadConfig.from_dict(cfg["head"]) if cfg.get("head") else None
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptArtifactError(f"{d}: bad {ADAPTER_CONFIG}: {exc}") from None
    base = load_hf_dir(base_path).model
    if not isinstance(base, Transformer):
        raise CorruptArtifactError(f"{d}: the base model is not a Transformer")
    model: nn.Module = base if head is None else head_model(base, head)
    apply_lora(base, lora)
    sd = _read_safetensors(d / ADAPTER_WEIGHTS)
    heads = {k: sd.pop(k) for k in list(sd) if k.startswith(_HEAD_WEIGHTS)}
    load_lora_state(model, sd)
    if head is not None:
        try:
            model.load_state_dict(heads, strict=False)
        except RuntimeError as exc:
            raise CorruptArtifactError(f"{d}: the head does not fit: {exc}") from None
        missing = [k for k in model.state_dict() if k.startswith(_HEAD_WEIGHTS) and k not in heads]
        if missing:
            raise CorruptArtifactError(f"{d}: missing head weights, e.g. {missing[0]}")
    model.eval()
    return model, Tokenizer.load(d), read_lineage(d), lora


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Load


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a HF-layout directory or a .gguf file."""
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"{p} does not exist")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise LmforgeError(f"{p} is a file but not .gguf; give a model directory or a GGUF")
        loaded = load_gguf(p)
    else:
        loaded = load_hf_dir(p)
    if dtype != torch.float32:
        loaded.model.to(dtype)
    loaded.model.eval()
    return loaded


def _read_json(path: Path) -> dict[str, Any]:
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


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
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
        return _read_safetensors(single)
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = (d / shard).resolve()
            if d.resolve() not in shard_path.parents:
                raise CorruptArtifactError(f"{index} points outside its directory: {shard}")
            sd.update(_read_safetensors(shard_path))
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


def load_state(
    model: Transformer | LSTMLanguageModel, sd: dict[str, torch.Tensor], source: str
) -> None:
    """Give MODEL (built by `empty_model`) the tensors of SD, without copying them.

    Strict: a missing, unexpected or misshapen tensor is a one-line error naming the first one.
    """
    expected = model.state_dict()
    if model.config.tie_embeddings:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(k for k in set(sd) - set(expected) if not k.endswith("rotary_emb.inv_freq"))
    if missing:
        raise CorruptArtifactError(f"{source}: missing weights, e.g. {missing[0]} ({len(missing)})")
    if unexpected:
        raise CorruptArtifactError(f"{source}: unexpected weights, e.g. {unexpected[0]}")
    for name, target in expected.items():
        got, want = tuple(sd[name].shape), tuple(target.shape)
        if got != want:
            raise CorruptArtifactError(f"{source}: {name} has shape {got}, expected {want}")
        got_dtype, want_dtype = sd[name].dtype, target.dtype
        if got_dtype != want_dtype and not (
            got_dtype.is_floating_point and want_dtype.is_floating_point
        ):
            raise CorruptArtifactError(
                f"{source}: {name} has dtype {got_dtype}, expected {want_dtype}"
            )
    # Float tensors become fp32; a quantized layer's integer tensors stay as they are.
    tensors = {k: sd[k].to(torch.float32) if sd[k].is_floating_point() else sd[k] for k in expected}
    model.load_state_dict(tensors, strict=False, assign=True)
    if isinstance(model, LSTMLanguageModel):
        if model.config.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return
    if model.config.tie_embeddings and not isinstance(model.lm_head, QuantLinear):
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_buffers()


def load_hf_dir(d: Path) -> LoadedModel:
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ModelNotFoundError(f"{d} is not a model directory (no config.json)")
    hf = _read_json(cfg_path)
    head = head_config_from_hf(hf, str(d))
    if head is not None:
        what, route = (
            ("a classification", "classifications")
            if head.task == "classify"
            else ("an extractive QA", "answers")
        )
        raise LmforgeError(
            f"{d} is {what} model, not a language model: use it with `lmforge eval --task "
            f"{head.task}` or the server's /v1/{route}"
        )
    config = config_from_hf(hf, str(d))
    quant = quant_config_from_hf(hf, str(d))
    tokenizer = Tokenizer.load(d)
    sd = read_hf_weights(d)
    # An LSTM's tensors are stored under its own names, a Transformer's under HF's.
    if isinstance(config, ModelConfig):
        sd = gpt2_to_ours(sd) if config.arch == "gpt2" else llama_to_ours(sd, config)
    model = empty_model(config)
    if quant is not None:
        if not isinstance(model, Transformer):
            raise CorruptArtifactError(f"{d}: only Transformer models can be quantized")
        try:
            quantize_model(model, quant)  # empty quantized layers for load_state to fill
        except LmforgeError as exc:
            raise CorruptArtifactError(f"{d}: {exc}") from None
    load_state(model, sd, str(d))
    gen_path = d / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else {}
    return LoadedModel(model, tokenizer, d, gen, read_lineage(d))


def read_lineage(directory: Path) -> dict[str, Any]:
    """lmforge.json of a model directory ({} when it has none, e.g. a Hugging Face download)."""
    path = directory / LINEAGE_FILE
    return _read_json(path) if path.is_file() else {}


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
    load_state(model, llama_to_ours(sd, config), str(path))
    gen = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
    }
    lineage = {"source": {"kind": "gguf", "path": str(path), "name": meta.get("general.name")}}
    return LoadedModel(model, tokenizer, path, gen, lineage)
