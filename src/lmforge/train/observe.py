"""What a person watches while a run trains: TensorBoard events and `loss.png`.

`RunObserver` is the loop's `on_step` callback: every step's record (see `loop.py`) becomes
TensorBoard scalars under `RUN/tensorboard/` (`tensorboard --logdir ~/.lmforge/runs`), and every
evaluation redraws `RUN/loss.png` — train loss (raw and smoothed) and validation loss against
tokens seen — from `metrics.jsonl`, so a resumed run's picture covers the whole run.

A resumed run purges the TensorBoard events of the steps it repeats (`purge_step`), so the
curves never fold back on themselves.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from lmforge.atomic import write_with
from lmforge.train.loop import read_metrics

log = logging.getLogger(__name__)

LOSS_PNG = "loss.png"
TENSORBOARD_DIR = "tensorboard"


class RunObserver:
    """on_step callback writing TensorBoard scalars and refreshing loss.png at evaluations."""

    def __init__(self, run_dir: Path, *, title: str = "", tensorboard: bool = True) -> None:
        self.run_dir = run_dir
        self.title = title
        self.tensorboard = tensorboard
        self._writer: Any = None

    def __call__(self, record: dict[str, Any]) -> None:
        step = record["step"]
        writer = self._open(step)
        if writer is not None:
            writer.add_scalar("train/loss", record["loss"], step)
            writer.add_scalar("train/lr", record["lr"], step)
            if math.isfinite(record.get("grad_norm", math.nan)):
                writer.add_scalar("train/grad_norm", record["grad_norm"], step)
            if record.get("step_s"):
                writer.add_scalar(
                    "train/tokens_per_s", record["tokens"] / step / record["step_s"], step
                )
        if "val_loss" in record:
            if writer is not None:
                writer.add_scalar("val/loss", record["val_loss"], step)
                writer.add_scalar("val/perplexity", math.exp(min(record["val_loss"], 50)), step)
                writer.flush()
            plot_losses(self.run_dir, title=self.title)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _open(self, first_step: int) -> Any:
        if self._writer is None and self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run logged after its last checkpoint.
            self._writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=first_step)
        return self._writer


def plot_losses(run_dir: Path, *, title: str = "") -> Path:
    """Draw RUN_DIR/loss.png from its metrics.jsonl (atomically replaced)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if records:
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (step)")
        # Smooth over ~2% of the run so the curve neither lags nor jitters at any length.
        weight = min(0.99, max(0.0, 1 - 50 / len(losses)))
        ax.plot(
            steps,
            _smooth(losses, weight),
            color="tab:blue",
            linewidth=1.6,
            label="train (smoothed)",
        )
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if val:
            ax.plot(*zip(*val, strict=True), "o-", color="tab:orange", label="validation")
            best_step, best = min(val, key=lambda p: p[1])
            ax.annotate(
                f"best {best:.3f}",
                (best_step, best),
                textcoords="offset points",
                xytext=(0, -14),
                ha="center",
                fontsize=8,
                color="tab:orange",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    path = run_dir / LOSS_PNG
    write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def _smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard-style exponential moving average with bias correction."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out
