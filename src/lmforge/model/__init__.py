"""Models: the decoder-only Transformer, its KV cache, the LSTM baseline, checkpoint formats."""
