"""Evaluation: metrics, and (next) the eval tasks and harness."""
