"""Task-head models in the Hugging Face layout: `*ForSequenceClassification` (`score`, no bias)
and `*ForQuestionAnswering` (`qa_outputs`), the decoder's weights under the prefix HF's class
keeps them under (`families.Family.qa_prefix`), the head's settings under `lmforge_head`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import CorruptArtifactError, LmforgeError, ModelNotFoundError
from lmforge.model.formats.families import FAMILIES
from lmforge.model.formats.hf import (
    config_from_hf,
    config_to_hf,
    empty_model,
    load_state,
    read_lineage,
)
from lmforge.model.formats.safetensors_io import read_hf_weights, read_json
from lmforge.model.formats.tensors import hf_to_ours, ours_to_hf
from lmforge.model.heads import HeadConfig, HeadModel, head_model
from lmforge.model.transformer import ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer

HEAD_WEIGHTS = ("score.", "qa_outputs.")
_HEAD_CLASSES = {"classify": "ForSequenceClassification", "qa": "ForQuestionAnswering"}


def _head_layout(config: ModelConfig, task: str) -> tuple[str, str]:
    """(architectures entry, prefix of the decoder's weights) of CONFIG's family's head class."""
    family = FAMILIES[config.arch]
    base = family.hf_class.removesuffix("LMHeadModel").removesuffix("ForCausalLM")
    prefix = family.qa_prefix if task == "qa" else "model."
    if not family.llama_keys:  # GPT-2 keeps its decoder under transformer. for both heads
        prefix = "transformer."
    return base + _HEAD_CLASSES[task], prefix


def head_config_to_hf(model: HeadModel, tokenizer: Tokenizer) -> dict[str, Any]:
    arch, _ = _head_layout(model.config, model.head.task)
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
    _, prefix = _head_layout(model.config, model.head.task)
    body = {k: v.detach() for k, v in model.body.state_dict().items()}
    out = {}
    for k, v in ours_to_hf(body, model.config).items():
        out[prefix + k.removeprefix("transformer.").removeprefix("model.")] = v
    for name, t in model.state_dict().items():
        if name.startswith(HEAD_WEIGHTS):
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
    hf = read_json(cfg_path)
    head = head_config_from_hf(hf, str(d))
    if head is None:
        raise LmforgeError(f"{d} is a language model, not a classification or QA model")
    config = config_from_hf({**hf, "tie_word_embeddings": False}, str(d))
    if not isinstance(config, ModelConfig):
        raise LmforgeError(f"{d}: task heads need a Transformer, not an LSTM")
    _, prefix = _head_layout(config, head.task)
    sd = read_hf_weights(d)
    heads = {k: sd.pop(k) for k in list(sd) if k.startswith(HEAD_WEIGHTS)}
    body_prefix = "transformer." if not FAMILIES[config.arch].llama_keys else "model."
    renamed = {body_prefix + k.removeprefix(prefix): v for k, v in sd.items()}
    body_sd = hf_to_ours(renamed, config)
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
