"""LoRA adapters: a small directory (`adapter_config.json`, `adapter_model.safetensors`, the
tokenizer, `lmforge.json`) that names its base model's directory and that base's checksum."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.atomic import write_text_atomic, write_with
from lmforge.errors import CorruptArtifactError, ModelNotFoundError
from lmforge.model.formats.heads import HEAD_WEIGHTS
from lmforge.model.formats.hf import LINEAGE_FILE, load_hf_dir, read_lineage
from lmforge.model.formats.safetensors_io import file_sha256, read_json, read_safetensors
from lmforge.model.heads import HeadConfig, HeadModel, head_model
from lmforge.model.lora import LoraConfig, apply_lora, load_lora_state, lora_state_dict
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer

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
                if k.startswith(HEAD_WEIGHTS)
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
    cfg = read_json(d / ADAPTER_CONFIG)
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
    sd = read_safetensors(d / ADAPTER_WEIGHTS)
    heads = {k: sd.pop(k) for k in list(sd) if k.startswith(HEAD_WEIGHTS)}
    load_lora_state(model, sd)
    if head is not None:
        try:
            model.load_state_dict(heads, strict=False)
        except RuntimeError as exc:
            raise CorruptArtifactError(f"{d}: the head does not fit: {exc}") from None
        missing = [k for k in model.state_dict() if k.startswith(HEAD_WEIGHTS) and k not in heads]
        if missing:
            raise CorruptArtifactError(f"{d}: missing head weights, e.g. {missing[0]}")
    model.eval()
    return model, Tokenizer.load(d), read_lineage(d), lora
