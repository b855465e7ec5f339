"""Pretraining as a stage: `TrainConfig`, the model it builds, the run it records.

    config = load_config(TrainConfig, file="run.yaml", overrides=["--loop.lr=3e-4"])
    plan = plan_training(config, dataset_dir)         # model + splits, all checks, no writes
    run = prepare_run(config, dataset_dir, runs_dir)  # new, or `--resume auto|PATH`
    result = pretrain(config, run, plan, on_step=observer)
    export_model(result, target_dir)

`TrainConfig` is what `lmforge train` flags and YAML files set: the data set, a named model
config (`model/presets.py`) with field overrides (`arch.*`) or a model to continue from
(`init_from`), the loop's settings (`loop.*`, see `loop.LoopConfig`) and the strategy. A run
lives in `runs/<run id>/`: `config.yaml` (the resolved config), `run.json` (status, data set,
timing), `metrics.jsonl`, checkpoints, `tensorboard/`, `loss.png`.

Resuming checks that the config is the one the run started with, apart from settings that do
not change the computation (evaluation and checkpoint cadence, time limit, compile, strategy);
anything else is an error that names the keys, since it would silently break the exact resume.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from lmforge.atomic import atomic_directory, write_text_atomic
from lmforge.config import dump_yaml, read_yaml, to_dict
from lmforge.data.loader import TokenSplit, check_windows
from lmforge.data.shards import read_manifest, shard_infos
from lmforge.errors import LmforgeError
from lmforge.model.formats import LoadedModel, save_model
from lmforge.model.presets import model_config
from lmforge.model.quant import refuse_training
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoints import list_checkpoints
from lmforge.train.distributed import Distributed
from lmforge.train.loop import LoopConfig, StepCallback, TrainResult, train, with_block_size
from lmforge.train.tasks import TokenWindows, TrainData

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
# Settings a resumed run may change: they do not alter any step's computation. (`teacher`, of
# distillation: another spec of the same weights, e.g. `t` → `t@1`; distill checks the weights.)
RESUMABLE_CHANGES = frozenset(
    {
        "resume",
        "teacher",
        "strategy",
        "loop.eval_every",
        "loop.eval_batches",
        "loop.ckpt_every",
        "loop.keep_checkpoints",
        "loop.time_limit",
        "loop.compile",
    }
)


@dataclass
class ArchOverrides:
    """Model fields that replace the preset's; None keeps the preset's value."""

    n_layer: int | None = None
    n_head: int | None = None
    n_kv_head: int | None = None
    d_model: int | None = None
    d_ff: int | None = None
    head_dim: int | None = None
    max_seq_len: int | None = None
    dropout: float | None = None
    rope_theta: float | None = None
    norm_eps: float | None = None
    tie_embeddings: bool | None = None
    init_std: float | None = None
    sliding_window: int | None = None
    qk_norm: str | None = None

    def given(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }


@dataclass
class TrainConfig:
    """Everything `lmforge train` needs; flags, YAML keys and `--section.field=value` map here."""

    data: str = ""
    """Data set name (see `lmforge data list`) or directory."""
    model: str = ""
    """Named model config (`tiny`, `small`, `nanogpt-shakespeare-cpu`, …); not with init_from."""
    name: str = ""
    """Registry name of the trained model."""
    init_from: str | None = None
    """A model to continue pretraining (registry name, built-in or directory)."""
    resume: str | None = None
    """`auto` (the newest unfinished run of this name) or a checkpoint / run directory."""
    strategy: Literal["single", "ddp", "fsdp"] = "single"
    arch: ArchOverrides = field(default_factory=ArchOverrides)
    loop: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self) -> None:
        if not self.data:
            raise LmforgeError("--data is required (a data set name or directory)")
        if not self.name:
            raise LmforgeError("--name is required (the registry name of the trained model)")
        if self.model and self.init_from:
            raise LmforgeError("give --model (train from scratch) or --init-from, not both")
        if not self.model and not self.init_from:
            raise LmforgeError("--model is required (e.g. tiny, small) unless --init-from is given")
        fixed = sorted(set(self.arch.given()) - {"dropout"}) if self.init_from else []
        if fixed:
            keys = ", ".join(f"arch.{k}" for k in fixed)
            raise LmforgeError(
                f"{keys}: --init-from fixes the model's shape (only dropout changes)"
            )


class RunSettings(Protocol):
    """What run management needs of a stage's config (`TrainConfig`, `FinetuneConfig`, …)."""

    name: str
    resume: str | None
    data: str


@dataclass
class Run:
    """A run directory and what it trains on."""

    id: str
    dir: Path
    dataset_dir: Path
    resume: bool | Path = False
    """False: a new run; True: from its newest checkpoint; a path: from that checkpoint."""


@dataclass
class PretrainResult:
    model: nn.Module
    tokenizer: Tokenizer
    result: TrainResult
    lineage: dict[str, Any]


def start_run(config: RunSettings, dataset_dir: Path, runs_dir: Path, run_id: str = "") -> Run:
    """A new run directory `runs_dir/<name>-<UTC time>-<hex>` with config.yaml and run.json."""
    run_id = run_id or new_run_id(config.name)
    run_dir = runs_dir / run_id
    with atomic_directory(run_dir) as tmp:  # a kill never leaves a run without its config
        write_text_atomic(tmp / CONFIG_FILE, dump_yaml(config))
        write_run_file(tmp, status="running", name=config.name, dataset=str(dataset_dir))
    return Run(run_id, run_dir, dataset_dir)


def prepare_run(
    config: RunSettings, dataset_dir: Path, runs_dir: Path, dist: Distributed | None = None
) -> Run:
    """The run CONFIG asks for: new, `--resume auto`, or `--resume PATH` (checkpoint or run dir).

    Under torchrun, rank 0 decides and creates; the others follow its run id.
    """
    dist = dist or Distributed()
    if config.resume in (None, "auto"):
        run = None
        if dist.is_main:
            found = find_resumable(config, runs_dir) if config.resume == "auto" else None
            run = found or start_run(config, dataset_dir, runs_dir)
        run_id = dist.broadcast_text(run.id if run is not None else "")
        # Other ranks follow rank 0's run (resume=True finds no checkpoint in a new one).
        return run if run is not None else open_run(config, runs_dir / run_id)
    path = Path(config.resume).expanduser()
    if path.is_file():
        run = open_run(config, path.parent)
        run.resume = path
        return run
    if path.is_dir():
        return open_run(config, path)
    raise LmforgeError(f"--resume {config.resume}: no such checkpoint or run directory")


def new_run_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def find_resumable(config: RunSettings, runs_dir: Path) -> Run | None:
    """For `--resume auto`: the newest unfinished run of config.name, checked against CONFIG.

    None (start a new run) when there is none, or when the newest one never wrote a
    checkpoint and was started with other settings (nothing of it would be kept anyway).
    """
    candidates = []
    for d in runs_dir.glob(f"{config.name}-*") if runs_dir.is_dir() else []:
        info = read_run_file(d)
        if info.get("name") == config.name and info.get("status") != "completed":
            candidates.append((d.stat().st_mtime, d, info))
    if not candidates:
        return None
    _, run_dir, info = max(candidates, key=lambda c: c[0])
    if not list_checkpoints(run_dir) and _changed_settings(config, run_dir):
        return None
    return open_run(config, run_dir, info)


def _changed_settings(config: RunSettings, run_dir: Path) -> dict[str, tuple[Any, Any]]:
    """Key → (the run's value, CONFIG's) where they differ, RESUMABLE_CHANGES left out."""
    saved = _flatten(read_yaml(run_dir / CONFIG_FILE))
    now = _flatten(to_dict(config))
    keys = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES)
    return {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}


def open_run(config: RunSettings, run_dir: Path, info: dict[str, Any] | None = None) -> Run:
    """An existing run directory, its config checked against CONFIG (see RESUMABLE_CHANGES)."""
    if not (run_dir / CONFIG_FILE).is_file():
        raise LmforgeError(f"--resume {run_dir}: not a training run (no {CONFIG_FILE})")
    info = info if info is not None else read_run_file(run_dir)
    changed = _changed_settings(config, run_dir)
    if changed:
        detail = ", ".join(f"{k}: {old!r} → {new!r}" for k, (old, new) in list(changed.items())[:4])
        raise LmforgeError(
            f"run {run_dir.name} was started with other settings ({detail}); resume with the "
            "same settings or start a new run without --resume"
        )
    return Run(run_dir.name, run_dir, Path(info.get("dataset", config.data)), resume=True)


def check_same_tokenizer(
    data: Tokenizer, model: Tokenizer, model_name: str, flag: str = "--init-from"
) -> None:
    """The data set must be tokenized with the vocabulary of the model it continues (FLAG: the
    option that named the model, `--init-from` or distillation's `--teacher`)."""
    if data.backend.get_vocab(with_added_tokens=True) != model.backend.get_vocab(
        with_added_tokens=True
    ):
        raise LmforgeError(
            f"the data set's vocabulary ({data.vocab_size:,} tokens) is not the one of "
            f"{flag} {model_name} ({model.vocab_size:,} tokens): prepare the data with "
            f"--tokenizer {model_name}"
        )


def build_model(config: TrainConfig, vocab_size: int, init: LoadedModel | None) -> nn.Module:
    """A freshly initialised preset model, or INIT's model (with a new dropout if asked)."""
    if init is not None:
        model: nn.Module = init.model
        dropout = config.arch.dropout
        if dropout is not None:
            model.config.dropout = dropout  # type: ignore[union-attr]
        return model
    torch.manual_seed(config.loop.seed)  # the initial weights depend on the seed only
    return new_model(model_config(config.model, vocab_size, config.arch.given()))


def new_model(shape: Any) -> nn.Module:
    """A freshly initialised model of SHAPE (a `ModelConfig` or an `LSTMConfig`)."""
    from lmforge.model.lstm import LSTMConfig, LSTMLanguageModel

    if isinstance(shape, LSTMConfig):
        return LSTMLanguageModel(shape)
    from lmforge.model.transformer import Transformer

    return Transformer(shape)


@dataclass
class Plan:
    """What a run trains, checked before anything is written."""

    model: nn.Module
    tokenizer: Tokenizer  # saved with the trained model
    train_split: TokenSplit
    val_split: TokenSplit | None
    init_ref: str | None = None  # the model continued from, as the user named it


def plan_training(
    config: TrainConfig,
    dataset_dir: Path,
    *,
    init: LoadedModel | None = None,
    init_ref: str | None = None,
    dist: Distributed | None = None,
) -> Plan:
    """The model (fresh or INIT's) and splits for CONFIG; every mismatch is an error here."""
    dist = dist or Distributed()
    data_tokenizer = Tokenizer.load(dataset_dir)
    if init is not None:
        refuse_training(init.model, init_ref or str(init.path))
        check_same_tokenizer(data_tokenizer, init.tokenizer, init_ref or str(init.path))
    train_split = TokenSplit.open(dataset_dir, "train")
    val_split = _optional_split(dataset_dir, "val")
    model = build_model(config, data_tokenizer.vocab_size, init)
    loop = with_block_size(config.loop, model)
    dist.rows(loop.batch_size)
    for split in (train_split, val_split):
        if split is not None:
            check_windows(split, loop.batch_size, loop.block_size)
    tokenizer = init.tokenizer if init is not None else data_tokenizer
    return Plan(model, tokenizer, train_split, val_split, init_ref)


def pretrain(
    config: TrainConfig,
    run: Run,
    plan: Plan,
    *,
    on_step: StepCallback | None = None,
    dist: Distributed | None = None,
) -> PretrainResult:
    """Train PLAN's model per CONFIG in RUN's directory (resuming as run.resume says)."""
    dist = dist or Distributed()
    data = TokenWindows(plan.train_split, plan.val_split)
    model, result = train_in_run(plan, data, config.loop, run, on_step=on_step, dist=dist)
    lineage = run_lineage(config, run, result, model, init_ref=plan.init_ref, dist=dist)
    finish_run(run, result, lineage, dist)
    return PretrainResult(model, plan.tokenizer, result, lineage)


def train_in_run(
    plan: Plan,
    data: TrainData,
    loop: LoopConfig,
    run: Run,
    *,
    on_step: StepCallback | None,
    dist: Distributed,
) -> tuple[nn.Module, TrainResult]:
    """PLAN's model trained on DATA through the one loop in RUN's directory, and the loop's
    result; an error marks run.json `failed`. Under FSDP the model comes back whole on rank 0."""
    try:
        result = train(
            plan.model, data, loop, run.dir, resume=run.resume, on_step=on_step, dist=dist
        )
    except LmforgeError as exc:
        if dist.is_main:
            write_run_file(run.dir, status="failed", error=str(exc))
        raise
    model = plan.model
    if dist.strategy == "fsdp":  # its parameters are shards: gather them into a plain model
        full = dist.model_state(model)  # a collective; only rank 0 receives the tensors
        if dist.is_main:
            model = new_model(getattr(model, "config"))  # noqa: B009
            model.load_state_dict(full)
    return model, result


def finish_run(run: Run, result: TrainResult, lineage: dict[str, Any], dist: Distributed) -> None:
    """run.json: `completed` (or `stopped` by --time-limit) with the model's LINEAGE."""
    if dist.is_main:
        status = "stopped" if result.stopped_early else "completed"
        write_run_file(run.dir, status=status, result=lineage)


def run_lineage(
    config: TrainConfig,
    run: Run,
    result: TrainResult,
    model: nn.Module,
    *,
    init_ref: str | None,
    dist: Distributed,
) -> dict[str, Any]:
    """What `lmforge.json` records about how the model was made."""
    manifest = read_manifest(run.dataset_dir)
    model_shape = getattr(model, "config")  # noqa: B009 - nn.Module's __getattr__ is untyped
    val = result.val_loss
    return {
        "name": config.name,
        "run_id": run.id,
        "run_dir": str(run.dir),
        "stage": "pretrain",
        "dataset": {
            "name": manifest.get("name"),
            "path": str(run.dataset_dir),
            "content_key": manifest.get("content_key"),
        },
        "parent": init_ref,
        "config": to_dict(config),
        "model_config": model_shape.to_dict(),
        "steps": result.step,
        "tokens_seen": result.tokens,
        "wall_seconds": round(result.total_seconds, 3),
        "cpu_seconds": round(result.cpu_seconds, 3),
        "gpu_seconds": 0.0,
        "world_size": dist.world_size,
        "strategy": dist.strategy,
        "eval": {
            "train_loss": result.train_loss,
            "val_loss": val,
            "val_perplexity": math.exp(val) if val is not None else None,
            "best_val_loss": result.best_val_loss,
        },
    }


def export_model(result: PretrainResult, directory: Path) -> Path:
    """Write the trained model to DIRECTORY in the Hugging Face layout with its lineage."""
    shape = getattr(result.model, "config")  # noqa: B009 - nn.Module's __getattr__ is untyped
    from lmforge.model.lstm import LSTMConfig

    if not isinstance(shape, LSTMConfig):  # a Transformer's context (an LSTM has none)
        result.tokenizer.model_max_length = shape.max_seq_len
    return save_model(result.model, result.tokenizer, directory, lineage=result.lineage)  # type: ignore[arg-type]


def _optional_split(dataset_dir: Path, split: str) -> TokenSplit | None:
    if not shard_infos(read_manifest(dataset_dir), split):
        log.warning("data set %s has no %s split: no evaluation", dataset_dir.name, split)
        return None
    return TokenSplit.open(dataset_dir, split)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_run_file(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def write_run_file(run_dir: Path, **fields_: Any) -> None:
    info = read_run_file(run_dir)
    info.update(fields_, updated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_text_atomic(run_dir / RUN_FILE, json.dumps(info, indent=2, default=str))
