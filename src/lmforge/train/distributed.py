"""Data-parallel training under `torchrun`: process group, model wrapping, full-state checkpoints.

    torchrun --nproc-per-node 2 -m lmforge train --data D --model tiny --name M --strategy ddp

`Distributed.start(strategy)` reads torchrun's environment (`RANK`, `WORLD_SIZE`, …) and joins
the process group (gloo on CPU, NCCL on CUDA); `strategy="single"` is the one-process case and
needs no process group, so the loop has a single code path.

- `ddp`: `DistributedDataParallel` — every rank holds the whole model; gradients are averaged.
- `fsdp`: `fully_shard` (FSDP2) on every block and on the root — parameters, gradients and
  optimizer state are sharded across ranks and gathered per block for compute.

Data: every rank draws the same global batch of `batch_size` windows (same generator, same
seed) and keeps its own `batch_size / world_size` rows, so the optimizer sees the same global
batch as one process would, and the loss matches a single-process run up to float rounding.

Checkpoints hold *full* (unsharded) state dicts keyed by parameter name, from
`torch.distributed.checkpoint.state_dict`; rank 0 writes them, every rank reads them. So a run
can be resumed with a different strategy or number of processes.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)

Strategy = Literal["single", "ddp", "fsdp"]
STRATEGIES: tuple[Strategy, ...] = ("single", "ddp", "fsdp")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: strategy, rank and world size."""

    strategy: Strategy = "single"
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when a process group is joined (ddp/fsdp, even with one process)."""
        return self.strategy != "single"

    @classmethod
    def start(cls, strategy: str) -> Distributed:
        """Join the torchrun job for STRATEGY (no-op for `single`)."""
        if strategy not in STRATEGIES:
            raise LmforgeError(
                f"--strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}"
            )
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if strategy == "single":
            if world > 1:
                raise LmforgeError(
                    f"started by torchrun with {world} processes: add --strategy ddp or fsdp"
                )
            return cls()
        if "RANK" not in os.environ:
            raise LmforgeError(
                f"--strategy {strategy} needs torchrun: "
                f"torchrun --nproc-per-node N -m lmforge train … --strategy {strategy}"
            )
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
        return cls(strategy, dist.get_rank(), dist.get_world_size())

    def stop(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    # -- model -----------------------------------------------------------------------------

    def wrap(self, model: nn.Module) -> nn.Module:
        """MODEL prepared for this strategy (the same object for `single`)."""
        if self.strategy == "ddp":
            return nn.parallel.DistributedDataParallel(model)
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in _blocks(model):
                fully_shard(block)
            fully_shard(model)
        return model

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        """Skip the gradient all-reduce for a micro-batch that is not the step's last."""
        if sync or not self.active:
            yield
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            with model.no_sync():
                yield
        else:  # FSDP2
            model.set_requires_gradient_sync(False)  # type: ignore[operator]
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)  # type: ignore[operator]

    def state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Full model and optimizer state dicts, keyed by parameter name, on the CPU.

        A collective: every rank calls it; under ddp/fsdp only rank 0 gets the tensors (the
        others get empty dicts), which is all that writing a checkpoint needs."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, optimizer, options=options)

    def model_state(self, model: nn.Module) -> dict[str, Any]:
        """The full model state dict on the CPU (a collective; see `state`)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)

    def load_state(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        model_state: dict[str, Any],
        optimizer_state: dict[str, Any],
    ) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_state_dict(
            model,
            optimizer,
            model_state_dict=model_state,
            optim_state_dict=optimizer_state,
            options=options,
        )

    # -- communication ---------------------------------------------------------------------

    def mean(self, value: float) -> float:
        """VALUE averaged over the ranks."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def total(self, value: float) -> float:
        """VALUE summed over the ranks."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        """True on every rank if FLAG is true on any (so all ranks take the same branch)."""
        if not self.active:
            return flag
        t = torch.tensor([1 if flag else 0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast_text(self, text: str) -> str:
        """Rank 0's TEXT on every rank (sent as bytes: nothing is pickled)."""
        if not self.active:
            return text
        data = torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)
        size = torch.tensor([data.numel()])
        dist.broadcast(size, src=0)
        if not self.is_main:
            data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(data, src=0)
        return bytes(data.tolist()).decode("utf-8")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of BATCH_SIZE."""
        if batch_size % self.world_size:
            raise LmforgeError(
                f"--batch-size {batch_size} must be a multiple of the number of processes "
                f"({self.world_size})"
            )
        share = batch_size // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one (Transformer layers, else nothing)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []
