"""Fine-tuning as a stage: chat SFT, a classification head, a span-QA head; full or LoRA.

    config = FinetuneConfig(base="smollm2-135m-instruct", task="classify", data="train.tsv",
                            name="sst2", lora=LoraOptions(enabled=True))
    plan = plan_finetune(config, base_model, base_ref)   # reads and checks everything, no writes
    run = prepare_run(config, data_path, runs_dir)       # train/pretrain.py's run directories
    result = finetune(config, run, plan, on_step=observer)
    export_finetuned(result, target_dir)                 # a full model (LoRA merged or not used)
    export_adapter(result, adapter_dir)                  # LoRA only: the adapters, small

Training goes through `train/loop.py` like pretraining; only the data (`train/tasks.py`) and, for
classify and QA, the model (`model/heads.py`) differ. The number of steps is `--max-steps`, or
`--epochs` × the batches of one pass over the data.

LoRA freezes the decoder and trains the adapters — plus the new head, which starts random (as
PEFT's `modules_to_save`). The adapter directory holds `adapter_model.safetensors` (adapters and
head, a few MB), `adapter_config.json` (rank, alpha, targets, the base model's directory) and
`lmforge.json`; `model/formats/adapters.py`'s `load_adapter` rebuilds the model from it, and
`merge_lora` makes it an ordinary model again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from torch import nn

from lmforge.config import to_dict
from lmforge.data import examples as ex
from lmforge.data.features import require_chat_template
from lmforge.errors import LmforgeError
from lmforge.model.formats import LoadedModel, save_adapter, save_model
from lmforge.model.heads import HeadConfig, HeadModel, head_model
from lmforge.model.lora import LoraConfig, apply_lora, merge_lora
from lmforge.model.quant import refuse_training
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train.distributed import Distributed
from lmforge.train.loop import LoopConfig, StepCallback, TrainResult, train
from lmforge.train.pretrain import Run, write_run_file
from lmforge.train.tasks import LabelledTexts, PackedChat, QAFeatures, TrainData

log = logging.getLogger(__name__)

Task = Literal["sft", "classify", "qa"]
TASKS = ("sft", "classify", "qa")


@dataclass
class LoraOptions:
    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    targets: str = "q,k,v,o,gate,up,down"
    dropout: float = 0.0
    merge: bool = False
    """Write the merged full model too (`--merge`); without it only the adapters are written."""

    def config(self) -> LoraConfig:
        targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        return LoraConfig(rank=self.rank, alpha=self.alpha, targets=targets, dropout=self.dropout)


@dataclass
class FinetuneConfig:
    """Everything `lmforge finetune` needs; flags and `--section.field=value` map here."""

    base: str = ""
    """The model to fine-tune (registry name, built-in or directory)."""
    task: Task = "sft"
    data: str = ""
    """Training file: JSONL chats (sft), TSV/CSV/JSONL text+label (classify), SQuAD JSON (qa)."""
    name: str = ""
    """Registry name of the result."""
    val_data: str | None = None
    """Validation file of the same kind: validation loss during training, best.pt."""
    epochs: float = 1.0
    """Passes over the training data, unless loop.max_steps is given."""
    labels: str | None = None
    """classify: the label set in order, comma-separated (default: the training labels, sorted)."""
    pooling: str = "last"
    """classify: last | mean."""
    doc_stride: int = 128
    """qa: tokens shared by consecutive windows of a long context."""
    resume: str | None = None
    lora: LoraOptions = field(default_factory=LoraOptions)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(max_steps=1, block_size=512))

    def __post_init__(self) -> None:
        if not self.base:
            raise LmforgeError("--base is required (the model to fine-tune)")
        if self.task not in TASKS:
            raise LmforgeError(f"--task must be one of {', '.join(TASKS)}, not {self.task!r}")
        if not self.data:
            raise LmforgeError("--data is required (the training file)")
        if not self.name:
            raise LmforgeError("--name is required (the registry name of the result)")
        if not self.epochs > 0:
            raise LmforgeError(f"--epochs must be positive, not {self.epochs}")
        if self.lora.merge and not self.lora.enabled:
            raise LmforgeError("--merge needs --lora")
        if self.lora.enabled:
            self.lora.config()  # checks rank, alpha, targets


@dataclass
class FinetunePlan:
    model: nn.Module  # a Transformer (sft) or a head model, adapted when LoRA is on
    tokenizer: Tokenizer
    data: TrainData
    loop: LoopConfig  # with max_steps fixed
    base_ref: str
    base_path: Path
    examples: int
    head: HeadConfig | None = None
    lora: LoraConfig | None = None


@dataclass
class FinetuneResult:
    model: nn.Module
    tokenizer: Tokenizer
    result: TrainResult
    lineage: dict[str, Any]
    lora: LoraConfig | None
    base_path: Path


def plan_finetune(
    config: FinetuneConfig,
    base: LoadedModel,
    base_ref: str,
    *,
    steps_given: bool,
    dist: Distributed | None = None,
) -> FinetunePlan:
    """Read CONFIG's files and build the model to train on BASE; every bad input fails here."""
    dist = dist or Distributed()
    body = base.model
    if not isinstance(body, Transformer):
        raise LmforgeError(f"{base_ref} is an LSTM; fine-tuning needs a Transformer")
    refuse_training(body, base_ref)
    tok = base.tokenizer
    loop = config.loop
    block = min(loop.block_size or body.config.max_seq_len, body.config.max_seq_len)
    head: HeadConfig | None = None
    data: TrainData
    if config.task == "sft":
        require_chat_template(tok, base_ref)
        train_ex = ex.read_chat(config.data)
        val_ex = ex.read_chat(config.val_data) if config.val_data else []
        data = PackedChat.build(tok, train_ex, val_ex, block_size=block, seed=loop.seed)
        model: nn.Module = body
        n = len(train_ex)
    elif config.task == "classify":
        train_lt = ex.read_labeled(config.data)
        val_lt = ex.read_labeled(config.val_data) if config.val_data else []
        labels = _label_set(config.labels, train_lt)
        head = HeadConfig("classify", labels, config.pooling)
        data = LabelledTexts.build(tok, train_lt, labels, val_lt, max_len=block)
        model = head_model(body, head)
        n = len(train_lt)
    else:
        train_qa = ex.read_squad(config.data)
        val_qa = ex.read_squad(config.val_data) if config.val_data else []
        head = HeadConfig("qa", extra={"doc_stride": config.doc_stride, "max_len": block})
        data = QAFeatures.build(tok, train_qa, val_qa, max_len=block, doc_stride=config.doc_stride)
        model = head_model(body, head)
        n = len(train_qa)
    lora = None
    if config.lora.enabled:
        lora = config.lora.config()
        apply_lora(body, lora)  # freezes the decoder
        if isinstance(model, HeadModel):
            for name, p in model.named_parameters():
                if not name.startswith("body."):
                    p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / total)
    rows = len(getattr(data, "rows", ()))
    if not steps_given:
        per_epoch = math.ceil(rows / loop.batch_size)
        steps = max(1, math.ceil(config.epochs * per_epoch))
        loop = replace(loop, max_steps=steps, warmup=min(loop.warmup, steps // 10))
    loop = replace(loop, block_size=block)
    dist.rows(loop.batch_size)
    return FinetunePlan(model, tok, data, loop, base_ref, base.path, n, head=head, lora=lora)


def _label_set(given: str | None, examples: list[ex.LabeledText]) -> tuple[str, ...]:
    seen = sorted({e.label for e in examples})
    if given is None:
        if len(seen) < 2:
            raise LmforgeError(f"the training data has {len(seen)} label(s); a classifier needs 2+")
        return tuple(seen)
    labels = tuple(x.strip() for x in given.split(",") if x.strip())
    unknown = [x for x in seen if x not in labels]
    if unknown:
        raise LmforgeError(f"training label {unknown[0]!r} is not in --labels {given}")
    return labels


def finetune(
    config: FinetuneConfig,
    run: Run,
    plan: FinetunePlan,
    *,
    on_step: StepCallback | None = None,
    dist: Distributed | None = None,
) -> FinetuneResult:
    """Train PLAN's model in RUN's directory through the one training loop."""
    dist = dist or Distributed()
    try:
        result = train(
            plan.model, plan.data, plan.loop, run.dir, resume=run.resume, on_step=on_step, dist=dist
        )
    except LmforgeError as exc:
        if dist.is_main:
            write_run_file(run.dir, status="failed", error=str(exc))
        raise
    lineage = {
        "name": config.name,
        "run_id": run.id,
        "run_dir": str(run.dir),
        "stage": "finetune",
        "task": config.task,
        "parent": plan.base_ref,
        "parent_path": str(plan.base_path),
        "task_data": {
            "path": str(Path(config.data).resolve()),
            "sha256": ex.file_sha256(config.data),
            "format": config.task,
            "examples": plan.examples,
        },
        "config": to_dict(config),
        "loop": to_dict(plan.loop),
        "lora": to_dict(plan.lora) if plan.lora else None,
        "head": plan.head.to_dict() if plan.head else None,
        "model_config": getattr(plan.model, "config").to_dict(),  # noqa: B009
        "steps": result.step,
        "tokens_seen": result.tokens,
        "wall_seconds": round(result.total_seconds, 3),
        "cpu_seconds": round(result.cpu_seconds, 3),
        "gpu_seconds": 0.0,
        "world_size": dist.world_size,
        "eval": {
            "train_loss": result.train_loss,
            "val_loss": result.val_loss,
            "best_val_loss": result.best_val_loss,
        },
    }
    if dist.is_main:
        status = "stopped" if result.stopped_early else "completed"
        write_run_file(run.dir, status=status, result=lineage)
    return FinetuneResult(plan.model, plan.tokenizer, result, lineage, plan.lora, plan.base_path)


def export_adapter(result: FinetuneResult, directory: Path) -> Path:
    """LoRA runs: the adapters (and head) alone, with what is needed to rebuild the model."""
    if result.lora is None:
        raise LmforgeError("only a LoRA fine-tune has adapters to export")
    return save_adapter(
        result.model, result.tokenizer, directory, result.lora, result.base_path, result.lineage
    )


def export_finetuned(result: FinetuneResult, directory: Path) -> Path:
    """The fine-tuned model as an ordinary HF-layout model (LoRA merged into the weights)."""
    model = result.model
    if result.lora is not None:
        body = model.body if isinstance(model, HeadModel) else model
        merge_lora(body)  # type: ignore[arg-type]
    return save_model(model, result.tokenizer, directory, lineage=result.lineage)  # type: ignore[arg-type]
