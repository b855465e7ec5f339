"""lmforge: the whole LLM chain in one self-hosted tool.

Importing `lmforge` is cheap (no torch); `lmforge.load(...)` pulls in the model stack:

    import lmforge
    llm = lmforge.load("smollm2-135m-instruct")
    print(llm.generate("The capital of France is", max_tokens=16))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from lmforge.api import LLM

__all__ = ["LLM", "__version__", "load"]


def load(model: str | None = None, **kwargs: Any) -> LLM:
    """Load MODEL (registry name, HF directory, .gguf file or the built-in name) for use in Python.

    See `lmforge.api.load` for the options.
    """
    from lmforge.api import load as _load

    return _load(model, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from lmforge.api import LLM

        return LLM
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
