"""The one training loop: batches → loss → AdamW step, with evaluation and exact resume.

    result = train(model, TokenWindows(train_split, val_split), LoopConfig(max_steps=2000), run_dir)

The data (`train/tasks.py`) says what a batch is and what its loss is — pretraining windows,
packed SFT conversations, labelled texts, QA windows — so every stage trains through this loop.
Per step: the learning rate of the schedule, `grad_accum` micro-batches (bf16 autocast when
asked), gradient clipping, the optimizer step. Every `eval_every` steps and at the end: the
validation loss over `eval_batches` consecutive windows, and `best.pt` (weights only) when it
improved. Every `ckpt_every` steps and at the end: a checkpoint with everything needed to go on
exactly — model, optimizer, step, the global RNG (dropout), the sampler's generator and the
data stream's position — so a run killed at any moment and resumed (`resume=True`) computes the
same loss at every later step, bit for bit on CPU. A non-finite loss stops the run with a clear
error and leaves the last good checkpoint. One JSON line per step goes to `metrics.jsonl`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmforge.atomic import write_text_atomic, write_with
from lmforge.errors import LmforgeError
from lmforge.train.checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    remove_partial_writes,
    save_checkpoint,
)
from lmforge.train.distributed import Distributed
from lmforge.train.optim import build_optimizer, lr_at, set_lr
from lmforge.train.tasks import Batch, TrainData

log = logging.getLogger(__name__)


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU (AVX512-BF16 or AMX). Without
    them bf16 is emulated: a 576x1536 linear forward+backward under autocast took 220 ms
    against 9 ms in fp32 on an AVX2 EPYC."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


METRICS = "metrics.jsonl"
DEFAULT_BLOCK_MAX = 1024  # --block-size 0 takes the model's context, up to this


@dataclass(frozen=True)
class LoopConfig:
    """What the loop does; each field is the `lmforge train` flag of the same name."""

    max_steps: int = 2000
    batch_size: int = 12
    block_size: int = 0  # context length of the training windows; 0: the model's, ≤ 1024
    grad_accum: int = 1  # micro-batches per step
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0: no clipping
    seed: int = 1337
    eval_every: int = 250
    eval_batches: int = 20
    ckpt_every: int = 250
    keep_checkpoints: int = 2
    dtype: Literal["fp32", "bf16"] = "fp32"
    time_limit: float | None = None  # seconds: stop (with a checkpoint) after this long
    compile: bool = False  # torch.compile the model's forward and backward

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "eval_batches"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("block_size", "warmup", "eval_every", "ckpt_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise LmforgeError(f"--{name.replace('_', '-')} must not be negative")
        if not 0 <= self.min_lr <= self.lr:
            raise LmforgeError(f"--min-lr must be in [0, --lr], not {self.min_lr}")
        if self.grad_clip < 0:
            raise LmforgeError(f"--grad-clip must not be negative, not {self.grad_clip}")
        if self.dtype not in ("fp32", "bf16"):
            raise LmforgeError(f"--dtype must be fp32 or bf16, not {self.dtype!r}")
        if self.time_limit is not None and self.time_limit <= 0:
            raise LmforgeError(f"--time-limit must be positive, not {self.time_limit}")


@dataclass
class TrainResult:
    step: int  # steps done in total
    train_loss: float  # of the last step
    val_loss: float | None  # of the last evaluation
    best_val_loss: float | None
    tokens: int  # tokens seen in total, resumed runs included
    seconds: float  # wall time of this call
    resumed_from: int | None  # the step a resumed run started at
    stopped_early: bool  # by --time-limit
    total_seconds: float  # wall time of the whole run up to its last checkpoint and this call
    cpu_seconds: float  # CPU time of all processes, same span


StepCallback = Callable[[dict[str, Any]], None]


def evaluate(
    model: nn.Module, data: TrainData, config: LoopConfig, dtype: torch.dtype | None
) -> float:
    """Mean loss per target over DATA's first `eval_batches` validation batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data.val_batches(config.batch_size, config.block_size, config.eval_batches):
            loss, n = data.loss_sum(model, batch, partial(_autocast, dtype))
            total += loss
            count += n
    model.train(was_training)
    return total / max(1, count)


def train(
    model: nn.Module,
    data: TrainData,
    config: LoopConfig,
    run_dir: Path,
    *,
    resume: bool | Path = False,
    on_step: StepCallback | None = None,
    dist: Distributed | None = None,
) -> TrainResult:
    """Train MODEL on DATA in place; checkpoints and metrics go to RUN_DIR.

    RESUME: True for the newest checkpoint in RUN_DIR (none: start fresh), or a checkpoint
    path. DIST: this process's place in a torchrun job (default: one process); only rank 0
    writes files and calls ON_STEP.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    dist = dist or Distributed()
    config = with_block_size(config, model)
    data.check(model, config.batch_size, config.block_size)
    rows = dist.rows(config.batch_size)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    autocast_dtype = torch.bfloat16 if config.dtype == "bf16" else None
    on_cpu = next(model.parameters()).device.type == "cpu"
    if autocast_dtype is not None and on_cpu and not cpu_has_fast_bf16():
        log.warning(
            "this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 autocast runs about 20x "
            "slower than fp32 here; --dtype fp32 is faster"
        )
    module = dist.wrap(model)
    forward: nn.Module = torch.compile(module) if config.compile else module  # type: ignore[assignment]
    optimizer = build_optimizer(
        module, lr=config.lr, weight_decay=config.weight_decay, betas=(config.beta1, config.beta2)
    )
    sampler = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    step, best, resumed_from, tokens = 0, None, None, 0
    data_state: dict[str, int] = {}
    prior_wall, prior_cpu = 0.0, 0.0  # spent before this call, as of the resumed checkpoint
    found = _find_checkpoint(run_dir, resume)
    if found is not None:
        path, state = found
        dist.load_state(module, optimizer, state["model"], state["optimizer"])
        torch.set_rng_state(state["rng"])
        sampler.set_state(state["sampler"])
        step = resumed_from = int(state["step"])
        best = state.get("best_val_loss")
        data_state = state.get("data") or {}
        tokens = int(
            state.get("tokens", step * config.batch_size * config.block_size * config.grad_accum)
        )
        prior_wall, prior_cpu = state.get("wall_seconds", 0.0), state.get("cpu_seconds", 0.0)
        log.info("resumed from %s (step %d)", path, step)
    if dist.is_main:
        remove_partial_writes(run_dir)
        _truncate_metrics(run_dir, step)
    stream = data.stream(config.batch_size, config.block_size, sampler, config.seed)
    stream.restore(data_state)
    module.train()
    loss_value, val_loss, stopped_early = math.nan, None, False
    with contextlib.ExitStack() as stack:
        metrics = (
            stack.enter_context(open(run_dir / METRICS, "a", encoding="utf-8"))
            if dist.is_main
            else None
        )
        while step < config.max_steps:
            lr = lr_at(
                step,
                lr=config.lr,
                min_lr=config.min_lr,
                warmup=config.warmup,
                max_steps=config.max_steps,
            )
            set_lr(optimizer, lr)
            tick = time.perf_counter()
            loss_value, grad_norm, step_tokens = _step(
                forward, module, optimizer, stream, data, rows, config, autocast_dtype, dist
            )
            if not math.isfinite(loss_value):
                last = latest_checkpoint(run_dir)
                where = f"; the last good checkpoint is {last[0]}" if last else ""
                raise LmforgeError(
                    f"the loss became {loss_value} at step {step + 1} (try a lower --lr){where}"
                )
            step += 1
            tokens += step_tokens
            record: dict[str, Any] = {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": tokens,
                "step_s": time.perf_counter() - tick,
            }
            out_of_time = dist.any(
                config.time_limit is not None and time.perf_counter() - started >= config.time_limit
            )
            last_step = step == config.max_steps or out_of_time
            if data.has_val and (
                last_step or (config.eval_every and step % config.eval_every == 0)
            ):
                val_loss = evaluate(forward, data, config, autocast_dtype)
                record["val_loss"] = val_loss
                if best is None or val_loss < best:
                    best = val_loss
                    weights = dist.model_state(module)
                    if dist.is_main:
                        write_with(run_dir / "best.pt", partial(torch.save, weights))
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if last_step or (config.ckpt_every and step % config.ckpt_every == 0):
                model_state, optimizer_state = dist.state(module, optimizer)
                cpu = prior_cpu + dist.total(time.process_time() - cpu_started)
                if dist.is_main:
                    state = {
                        "step": step,
                        "model": model_state,
                        "optimizer": optimizer_state,
                        "rng": torch.get_rng_state(),
                        "sampler": sampler.get_state(),
                        "data": stream.state(),
                        "tokens": tokens,
                        "best_val_loss": best,
                        "config": asdict(config),
                        "world_size": dist.world_size,
                        "wall_seconds": prior_wall + time.perf_counter() - started,
                        "cpu_seconds": cpu,
                    }
                    save_checkpoint(run_dir, step, state, keep=config.keep_checkpoints)
                dist.barrier()  # no rank runs ahead of a checkpoint it may have to resume from
            if on_step is not None and dist.is_main:
                on_step(record)
            if out_of_time and step < config.max_steps:
                stopped_early = True
                break
    seconds = time.perf_counter() - started
    return TrainResult(
        step=step,
        train_loss=loss_value,
        val_loss=val_loss,
        best_val_loss=best,
        tokens=tokens,
        seconds=seconds,
        resumed_from=resumed_from,
        stopped_early=stopped_early,
        total_seconds=prior_wall + seconds,
        cpu_seconds=prior_cpu + dist.total(time.process_time() - cpu_started),
    )


def with_block_size(config: LoopConfig, model: nn.Module) -> LoopConfig:
    """CONFIG with block_size 0 replaced by the model's context (at most DEFAULT_BLOCK_MAX:
    continuing a model with an 8k context should not silently mean 8k-token windows on a
    CPU); a block longer than the context is an error."""
    context = getattr(getattr(model, "config", None), "max_seq_len", None)
    if config.block_size == 0:
        if context is None:
            raise LmforgeError("--block-size is needed: the model has no context length")
        return replace(config, block_size=min(int(context), DEFAULT_BLOCK_MAX))
    limited = getattr(getattr(model, "config", None), "arch", None) != "lstm"
    if limited and context is not None and config.block_size > context:
        raise LmforgeError(
            f"--block-size {config.block_size} is longer than the model's context ({context})"
        )
    return config


def _find_checkpoint(run_dir: Path, resume: bool | Path) -> tuple[Path, dict[str, Any]] | None:
    if resume is False:
        return None
    if resume is True:
        return latest_checkpoint(run_dir)
    try:
        return resume, load_checkpoint(resume)
    except FileNotFoundError:
        raise LmforgeError(f"--resume {resume}: no such checkpoint") from None
    except Exception as exc:
        raise LmforgeError(f"--resume {resume}: not a readable checkpoint ({exc})") from None


def _step(
    forward: nn.Module,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    data: TrainData,
    rows: slice,
    config: LoopConfig,
    dtype: torch.dtype | None,
    dist: Distributed,
) -> tuple[float, float, int]:
    """One optimizer step over `grad_accum` micro-batches; (mean loss, gradient norm, tokens
    of the whole batch across ranks).

    FORWARD is what computes (maybe compiled), MODULE what owns the parameters (maybe wrapped).
    Every rank draws the same global batch and trains on its ROWS of it.
    """
    total, tokens = 0.0, 0
    autocast = partial(_autocast, dtype)
    for micro in range(config.grad_accum):
        full = next(batches)
        tokens += data.tokens(full)
        batch = {k: v[rows] for k, v in full.items()}
        with dist.no_sync(module, sync=micro == config.grad_accum - 1):
            loss = data.loss(forward, batch, autocast) / config.grad_accum
            loss.backward()
        total += loss.item()
    if config.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(module.parameters(), config.grad_clip)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    else:
        grad_norm = math.nan
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return dist.mean(total), grad_norm, tokens


def _autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """RUN_DIR's metrics.jsonl, one record per step ([] when there is none yet)."""
    path = run_dir / METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop the lines of steps after STEP (logged by a run killed before its next checkpoint)."""
    path = run_dir / METRICS
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [r for r in read_metrics(run_dir) if r["step"] <= step]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
