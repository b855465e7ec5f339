"""Tokenizers: text ↔ token ids, special tokens and chat templates.

Only the CLI, the Python API and the server turn text into ids; every other stage works on ids.
"""

from lmforge.tokenizer.tokenizer import IncrementalDecoder, Tokenizer

__all__ = ["IncrementalDecoder", "Tokenizer"]
