"""`--device`: names resolved to torch devices, refused clearly when the machine lacks them."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model.devices import resolve_device


def test_cpu_and_auto() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want


@pytest.mark.parametrize("name", ["tpu", "gpu", "", "cuda:x", "mps:0"])
def test_unknown_devices_are_refused(name: str) -> None:
    with pytest.raises(LmforgeError, match="device"):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_clear_error() -> None:
    with pytest.raises(LmforgeError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(LmforgeError, match="no CUDA GPU"):
        resolve_device("cuda:1")
