"""Named model configurations for `lmforge train --model NAME`.

A preset fixes the shape of a model; the vocabulary size always comes from the data set's
tokenizer, and any field can be overridden (`--arch.n_layer=6`, `--dropout 0.1`).

| name                      | family      | layers | heads | d_model | context | params* |
|---------------------------|-------------|--------|-------|---------|---------|---------|
| `nanogpt-shakespeare-cpu` | gpt2        | 4      | 4     | 128     | 64      | 0.81 M  |
| `tiny`                    | llama       | 2      | 4     | 64      | 128     | 0.11 M  |
| `small`                   | gpt2        | 6      | 6     | 384     | 256     | 10.8 M  |
| `llama-small`             | llama (GQA) | 6      | 6 (2) | 384     | 256     | 9.5 M   |
| `gpt2-124m`               | gpt2        | 12     | 12    | 768     | 1024    | 85.9 M  |
| `tiny-qwen3`              | qwen3 (GQA) | 2      | 4 (2) | 64      | 128     | 0.10 M  |
| `tiny-gemma3`             | gemma3      | 6      | 4 (1) | 64      | 128     | 0.29 M  |
| `lstm`                    | lstm        | 2      | –     | 256     | 64      | 1.07 M  |

* for a 65-symbol vocabulary (tinyshakespeare, character level); `gpt2-124m` has 124 M with
GPT-2's 50,257 tokens.

`nanogpt-shakespeare-cpu` is nanoGPT's published CPU configuration for shakespeare-char
(github.com/karpathy/nanoGPT README, "I only have a macbook"); `small` is the "baby GPT" of
nanoGPT's `config/train_shakespeare_char.py`; `gpt2-124m` is GPT-2 small. `tiny-qwen3` (QK-norm) and
`tiny-gemma3` (5 sliding-window layers of 32 : 1 global, two RoPE θ, sandwich norms, QK-norm)
are the two newer families at test size; any family's defaults come with `arch` (config.py).
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

from lmforge.errors import LmforgeError
from lmforge.model.transformer import ModelConfig

if TYPE_CHECKING:
    from lmforge.model.lstm import LSTMConfig

PRESETS: dict[str, dict[str, Any]] = {
    "nanogpt-shakespeare-cpu": {
        "arch": "gpt2",
        "n_layer": 4,
        "n_head": 4,
        "d_model": 128,
        "max_seq_len": 64,
    },
    "tiny": {"arch": "llama", "n_layer": 2, "n_head": 4, "d_model": 64, "max_seq_len": 128},
    "small": {"arch": "gpt2", "n_layer": 6, "n_head": 6, "d_model": 384, "max_seq_len": 256},
    "llama-small": {
        "arch": "llama",
        "n_layer": 6,
        "n_head": 6,
        "n_kv_head": 2,
        "d_model": 384,
        "max_seq_len": 256,
    },
    "gpt2-124m": {"arch": "gpt2", "n_layer": 12, "n_head": 12, "d_model": 768, "max_seq_len": 1024},
    "tiny-qwen3": {
        "arch": "qwen3",
        "n_layer": 2,
        "n_head": 4,
        "n_kv_head": 2,
        "d_model": 64,
        "max_seq_len": 128,
    },
    "tiny-gemma3": {
        "arch": "gemma3",
        "n_layer": 6,
        "n_head": 4,
        "n_kv_head": 1,
        "d_model": 64,
        "head_dim": 16,
        "max_seq_len": 128,
        "sliding_window": 32,
    },
    "lstm": {"arch": "lstm", "n_layer": 2, "d_model": 256, "max_seq_len": 64},
}


def preset_names() -> list[str]:
    return list(PRESETS)


def model_config(
    name: str, vocab_size: int, overrides: dict[str, Any] | None = None
) -> ModelConfig | LSTMConfig:
    """The config of preset NAME for VOCAB_SIZE, with OVERRIDES (field → value) applied."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise LmforgeError(f"unknown model config {name!r}{hint}; known: {', '.join(PRESETS)}")
    fields = {**PRESETS[name], **(overrides or {}), "vocab_size": vocab_size}
    try:
        if fields["arch"] == "lstm":
            from lmforge.model.lstm import LSTMConfig

            return LSTMConfig.from_dict(fields)
        return ModelConfig.from_dict(fields)
    except ValueError as exc:  # the configs' own validation: name the preset too
        raise LmforgeError(f"model config {name!r}: {exc}") from None
