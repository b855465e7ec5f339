"""Training: the optimizer, the loop, checkpoints and distribution."""
