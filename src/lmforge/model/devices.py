"""Which device a model runs on: `--device cpu|cuda|cuda:N|auto` → a `torch.device`.

Everything the model, the engine's runner, its KV pool and the sampler create is born on the
model's device (STYLE #16); this is the one place that turns a user's choice into one.
"""

from __future__ import annotations

import torch

from lmforge.errors import LmforgeError

DEVICE_CHOICES = "cpu, cuda, cuda:N or auto"


def model_device(model: torch.nn.Module) -> torch.device:
    """The device MODEL's weights are on: where the tensors that serve it are born."""
    return next(model.parameters()).device


def resolve_device(name: str) -> torch.device:
    """NAME as a device; "auto" is the first CUDA GPU if there is one, else the CPU. A CUDA
    device that this machine does not have is an error naming it."""
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise LmforgeError(f"device must be {DEVICE_CHOICES}, got {name!r}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise LmforgeError(f"device must be {DEVICE_CHOICES}, got {name!r}")
    if not torch.cuda.is_available():
        raise LmforgeError(f"device {name!r}: this machine has no CUDA GPU (use cpu or auto)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise LmforgeError(
            f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
        )
    return device
