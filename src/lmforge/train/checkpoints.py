"""Training checkpoints: atomic files in the run directory, the newest complete one found again.

A checkpoint is one `torch.save` of plain data — model and optimizer state dicts, the step, the
RNG states (global and the data sampler's) and the best validation loss — written through
`atomic.write_with` (temp file, fsync, rename, directory fsync), so a `kill -9` at any moment
leaves either the previous checkpoint or the new one, never a torn file. Names sort by step
(`ckpt-00000250.pt`); only the newest `keep` are kept. Reading uses `weights_only=True`.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path
from typing import Any

import torch

from lmforge.atomic import write_bytes_atomic
from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)

_NAME = re.compile(r"ckpt-(\d{8})\.pt")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / f"ckpt-{step:08d}.pt"


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], *, keep: int = 2) -> Path:
    """Write STATE as the checkpoint of STEP, then delete all but the newest KEEP."""
    path = checkpoint_path(run_dir, step)
    # Serialized in memory first: torch.save reports a failed write (disk full, quota) as an
    # opaque RuntimeError from its zip writer, a plain file write as an OSError with errno.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        write_bytes_atomic(path, buffer.getbuffer())
    except OSError as exc:  # disk full, quota, …: the temp file is gone, older ones intact
        kept = list_checkpoints(run_dir)
        last = f"; the last complete checkpoint is {kept[-1].name}" if kept else ""
        raise LmforgeError(
            f"could not write checkpoint {path}: {exc.strerror or exc}{last}"
        ) from None
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def remove_partial_writes(run_dir: Path) -> list[Path]:
    """Delete temp files that a killed process left mid-write (`.ckpt-….tmp`, `.best.pt….tmp`)."""
    stale = sorted(run_dir.glob(".*.tmp")) if run_dir.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted write", path)
    return stale


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint files, oldest first (temp files of unfinished writes excluded)."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if _NAME.fullmatch(p.name))


def load_checkpoint(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise ValueError(f"{path} is not an lmforge training checkpoint")
    return state


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads, and its state; None when there is none."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except Exception as exc:  # a file damaged outside lmforge: try the one before
            log.warning("skipping unreadable checkpoint %s: %s", path, exc)
    return None
