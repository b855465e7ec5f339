"""The training loop on tiny models: learning, overfitting, exact resume, guards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_token_dataset
from lmforge.data.loader import TokenSplit
from lmforge.errors import LmforgeError
from lmforge.model.transformer import ModelConfig, Transformer
from lmforge.train.checkpoints import list_checkpoints
from lmforge.train.loop import LoopConfig, TrainResult, train
from lmforge.train.tasks import TokenWindows

VOCAB = 32


def make_splits(
    directory: Path, train: np.ndarray, val: np.ndarray
) -> tuple[TokenSplit, TokenSplit]:
    write_token_dataset(directory, {"train": train, "val": val}, VOCAB)
    return TokenSplit.open(directory, "train"), TokenSplit.open(directory, "val")


def patterned(n: int, seed: int) -> np.ndarray:
    """A learnable stream: each token mostly determines the next."""
    rng = np.random.default_rng(seed)
    ids = np.zeros(n, dtype=np.int64)
    for i in range(1, n):
        ids[i] = (ids[i - 1] * 5 + 3) % VOCAB if rng.random() < 0.9 else rng.integers(VOCAB)
    return ids


def tiny_model(seed: int = 0, dropout: float = 0.0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(
        arch="llama",
        vocab_size=VOCAB,
        d_model=32,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        d_ff=64,
        max_seq_len=32,
        dropout=dropout,
    )
    return Transformer(config)


@pytest.fixture
def splits(tmp_path: Path) -> tuple[TokenSplit, TokenSplit]:
    return make_splits(tmp_path / "data", patterned(20_000, 0), patterned(3_000, 1))


def run(splits, run_dir: Path, **options) -> tuple[TrainResult, list[dict]]:  # type: ignore[no-untyped-def]
    defaults = {
        "max_steps": 24,
        "batch_size": 4,
        "block_size": 16,
        "warmup": 2,
        "lr": 3e-3,
        "eval_every": 8,
        "eval_batches": 4,
        "ckpt_every": 8,
    }
    resume = options.pop("resume", False)
    on_step = options.pop("on_step", None)
    model = options.pop("model", None) or tiny_model(dropout=0.1)
    config = LoopConfig(**{**defaults, **options})
    result = train(model, TokenWindows(*splits), config, run_dir, resume=resume, on_step=on_step)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return result, [json.loads(line) for line in lines]


def test_loss_goes_down(splits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result, records = run(splits, tmp_path / "run", max_steps=80, eval_every=40)
    first = np.mean([r["loss"] for r in records[:5]])
    last = np.mean([r["loss"] for r in records[-5:]])
    assert last < 0.6 * first, (first, last)
    assert result.val_loss is not None and result.val_loss < records[0]["loss"]
    assert [r["step"] for r in records] == list(range(1, 81))
    assert (tmp_path / "run" / "best.pt").is_file()


def test_overfits_one_batch(tmp_path: Path) -> None:
    window = np.random.default_rng(5).integers(0, VOCAB, 17)  # unlearnable unless memorized
    train_split, _ = make_splits(tmp_path / "data", window, window)
    result = train(
        tiny_model(),
        TokenWindows(train_split, None),
        LoopConfig(
            max_steps=150,
            batch_size=2,
            block_size=16,
            warmup=5,
            lr=1e-2,
            min_lr=1e-3,
            weight_decay=0.0,
            eval_every=0,
            ckpt_every=0,
        ),
        tmp_path / "run",
    )
    assert result.train_loss < 0.05, result.train_loss


def test_resume_after_a_crash_repeats_every_loss_bit_for_bit(splits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, straight = run(splits, tmp_path / "a")

    class Crash(Exception):
        pass

    def crash_at_13(record: dict) -> None:
        if record["step"] == 13:
            raise Crash

    with pytest.raises(Crash):
        run(splits, tmp_path / "b", on_step=crash_at_13)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["ckpt-00000008.pt"]
    # A fresh model object: everything must come from the checkpoint.
    result, resumed = run(
        splits, tmp_path / "b", resume=True, model=tiny_model(seed=99, dropout=0.1)
    )
    assert result.resumed_from == 8
    assert [r["step"] for r in resumed] == list(range(1, 25))  # the lines of 9..13 were replaced
    for a, b in zip(straight, resumed, strict=True):
        assert a["loss"] == b["loss"], a["step"]
        assert a.get("val_loss") == b.get("val_loss"), a["step"]


def test_keeps_the_last_checkpoints_and_stops_on_time(splits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run(splits, tmp_path / "run", ckpt_every=4, keep_checkpoints=2)
    names = [p.name for p in list_checkpoints(tmp_path / "run")]
    assert names == ["ckpt-00000020.pt", "ckpt-00000024.pt"]
    result, _ = run(splits, tmp_path / "timed", max_steps=10_000, time_limit=0.5, ckpt_every=0)
    assert result.stopped_early and result.step < 10_000
    assert list_checkpoints(tmp_path / "timed")[-1].name == f"ckpt-{result.step:08d}.pt"


def test_non_finite_loss_stops_with_the_last_good_checkpoint(splits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model()

    def poison(record: dict) -> None:
        if record["step"] == 10:
            with torch.no_grad():
                model.lm_head.weight.fill_(float("nan"))

    with pytest.raises(LmforgeError, match=r"loss became nan at step 11 .*ckpt-00000008\.pt"):
        run(splits, tmp_path / "run", model=model, on_step=poison)


def test_bad_settings_are_named(splits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LmforgeError, match="--batch-size"):
        LoopConfig(batch_size=0)
    with pytest.raises(LmforgeError, match="--min-lr"):
        LoopConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(LmforgeError, match="longer than the model's context"):
        run(splits, tmp_path / "run", block_size=33)
    short = make_splits(tmp_path / "short", patterned(20, 0), patterned(20, 1))
    with pytest.raises(LmforgeError, match="fewer than block_size"):
        run(short, tmp_path / "run", block_size=32)
    small = Transformer(
        ModelConfig(
            arch="llama",
            vocab_size=16,
            d_model=32,
            n_layer=1,
            n_head=4,
            n_kv_head=4,
            d_ff=64,
            max_seq_len=32,
        )
    )
    with pytest.raises(LmforgeError, match="vocabulary"):
        run(splits, tmp_path / "run", model=small)


@pytest.mark.parametrize("fast", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_warns(  # type: ignore[no-untyped-def]
    splits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fast
) -> None:
    # Regression: bf16 autocast on an AVX2-only CPU made a LoRA fine-tune 20x slower, silently.
    monkeypatch.setattr("lmforge.train.loop.cpu_has_fast_bf16", lambda: fast)
    with caplog.at_level("WARNING", logger="lmforge.train.loop"):
        run(splits, tmp_path / "run", max_steps=2, dtype="bf16")
    warned = [r for r in caplog.records if "no native bf16" in r.getMessage()]
    assert bool(warned) is not fast
