"""Models: the decoder-only Transformer, its KV cache and the checkpoint formats."""
