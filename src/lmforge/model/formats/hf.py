"""The Hugging Face directory layout (read and write), for every family and the LSTM baseline.

- `config.json` (the family's `*ForCausalLM`, `families.py`), `model.safetensors` (metadata
  `format: pt`; sharded `model.safetensors.index.json` and `pytorch_model.bin` are read too),
  `tokenizer.json`, `tokenizer_config.json` (with `chat_template`), `generation_config.json`,
  and lmforge's own `lmforge.json` (lineage). A directory written here loads in
  `transformers.AutoModelForCausalLM.from_pretrained(dir)` unchanged.
- lmforge's LSTM baseline: the same layout, with `config.json` naming `LmforgeLSTMForCausalLM`
  (`model_type: lmforge-lstm`, the `LSTMConfig` under `lmforge_config`) and the weights under
  torch's own `nn.LSTM` names. `transformers` cannot load it; lmforge's `load_model` can.
- Quantized models (`model/quant.py`): the same layout and tensor names, with `config.json`'s
  `quantization_config` (`quant_method: lmforge`, `method` int8 or int4, `bits`, `group_size`,
  `head` int8/int4/float, `weight_layout`) and, for each quantized layer, `<layer>.qweight`
  (int8 [out, in], or uint8 [out, in/2] holding two int4 values per byte, the even input in the
  low nibble), `<layer>.scales` (fp32 [out] or [out, in/group]) and for int4 `<layer>.zeros`
  (fp32 [out, in/group]) in place of `<layer>.weight`; w = qweight · scales (int8) or
  (q − 8) · scales + zeros (int4). A quantized head is stored as `lm_head.*` even when the float
  head is tied to the embeddings. Only lmforge loads these back.

Every write is atomic; nothing is ever pickled.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.atomic import write_text_atomic, write_with
from lmforge.errors import CorruptArtifactError, LmforgeError, ModelNotFoundError
from lmforge.model.formats import families
from lmforge.model.formats.safetensors_io import (
    WEIGHTS_FILE,
    file_sha256,
    read_hf_weights,
    read_json,
)
from lmforge.model.formats.tensors import hf_to_ours, ours_to_hf
from lmforge.model.heads import HeadModel
from lmforge.model.lstm import LSTMConfig, LSTMLanguageModel
from lmforge.model.quant import QuantConfig, QuantLinear, quantization_of, quantize_model
from lmforge.model.transformer import ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

LINEAGE_FILE = "lmforge.json"


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
# config.json ↔ ModelConfig / LSTMConfig


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
    return {**families.config_to_hf(config), "torch_dtype": "float32", **ids}


def config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig | LSTMConfig:
    if hf.get("model_type") == LSTM_MODEL_TYPE:
        lmforge_config = hf.get("lmforge_config")
        if not isinstance(lmforge_config, dict):
            raise CorruptArtifactError(f"{source}: config.json lacks lmforge_config")
        try:
            return LSTMConfig.from_dict(lmforge_config)
        except ValueError as exc:
            raise CorruptArtifactError(f"{source}: {exc}") from None
    return families.config_from_hf(hf, source)


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
    return ours_to_hf(sd, model.config)


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
        from lmforge.model.formats.heads import head_config_to_hf, head_state_dict_for_hf

        hf = head_config_to_hf(model, tokenizer)  # first: it refuses what it cannot write
        tensors = head_state_dict_for_hf(model)
    else:
        hf = config_to_hf(model.config, tokenizer)
        tensors = state_dict_for_hf(model)
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
        from lmforge.model.formats.gguf_read import load_gguf

        loaded = load_gguf(p)
    else:
        loaded = load_hf_dir(p)
    if dtype != torch.float32:
        loaded.model.to(dtype)
    loaded.model.eval()
    return loaded


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
    hf = read_json(cfg_path)
    from lmforge.model.formats.heads import head_config_from_hf

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
        sd = hf_to_ours(sd, config)
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
    gen = read_json(gen_path) if gen_path.is_file() else {}
    return LoadedModel(model, tokenizer, d, gen, read_lineage(d))


def read_lineage(directory: Path) -> dict[str, Any]:
    """lmforge.json of a model directory ({} when it has none, e.g. a Hugging Face download)."""
    path = directory / LINEAGE_FILE
    return read_json(path) if path.is_file() else {}
