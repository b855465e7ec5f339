"""Model files: the only code that knows checkpoint formats.

- `families.py`: each model family's Hugging Face config ↔ `ModelConfig` features, and its
  per-layer tensor names (shared by every reader and writer);
- `tensors.py`: state dicts under a family's names ↔ ours (fusing and splitting Q/K/V, gate/up);
- `safetensors_io.py`: weight files and JSON, read with every offset checked;
- `hf.py`: the Hugging Face directory layout, read and written, for every family, quantized
  models and the LSTM baseline; `load_model` (a directory or a .gguf file);
- `heads.py`: classification and QA models; `adapters.py`: LoRA adapters;
- `gguf_layout.py`: each family's GGUF layout (llama.cpp architecture, tensor names, metadata
  keys) ↔ features; `gguf_read.py`, `gguf_write.py`: GGUF files (llama.cpp's format), read and
  written through it.
"""

from lmforge.model.formats.adapters import is_adapter, load_adapter, save_adapter
from lmforge.model.formats.heads import head_of, load_head_model
from lmforge.model.formats.hf import (
    LINEAGE_FILE,
    LSTM_ARCHITECTURE,
    LoadedModel,
    empty_model,
    load_hf_dir,
    load_model,
    read_lineage,
    save_model,
)
from lmforge.model.formats.safetensors_io import WEIGHTS_FILE, file_sha256

__all__ = [
    "LINEAGE_FILE",
    "LSTM_ARCHITECTURE",
    "WEIGHTS_FILE",
    "LoadedModel",
    "empty_model",
    "file_sha256",
    "head_of",
    "is_adapter",
    "load_adapter",
    "load_head_model",
    "load_hf_dir",
    "load_model",
    "read_lineage",
    "save_adapter",
    "save_model",
]
