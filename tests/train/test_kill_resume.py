"""kill -9 at random moments, `--resume auto`, and every later step's loss is bit-identical.

One uninterrupted reference run; then the same command is started, SIGKILLed, and started again
with `--resume auto`, over and over: at random moments (seeded), and once exactly while a
checkpoint is being written (its temp file is on disk). The final metrics.jsonl — every step's
loss, as logged by whichever process finally ran that step — must equal the reference's bit for
bit, and the registered model's weights must be identical.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import lmforge, lmforge_popen, write_token_dataset

KILLS = int(os.environ.get("LMFORGE_TRAIN_KILLS", "4"))  # make reliability: 20
STEPS = max(60, 10 * KILLS)  # room for every kill (each lets 1-8 steps run)


@pytest.fixture
def data_dir(tmp_path: Path, tiny_tokenizer) -> Path:  # type: ignore[no-untyped-def]
    import numpy as np

    rng = np.random.default_rng(0)
    vocab = tiny_tokenizer.vocab_size
    ids = (np.arange(40_000) * 7 + rng.integers(0, 3, 40_000)) % vocab
    d = tmp_path / "data"
    write_token_dataset(d, {"train": ids[:36_000], "val": ids[36_000:]}, vocab_size=vocab)
    tiny_tokenizer.save(d)
    return d


def command(data: Path) -> list[str]:
    return [
        "train", "--data", str(data), "--model", "tiny", "--name", "k",
        "--max-steps", str(STEPS), "--batch-size", "4", "--block-size", "32",
        "--ckpt-every", "3", "--eval-every", "20", "--eval-batches", "2", "--dropout", "0.1",
        "--resume", "auto", "-q",
    ]  # fmt: skip


def losses(run_dir: Path) -> list[tuple[int, float, float | None]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r.get("val_loss")) for r in records]


def only_run(home: Path) -> Path:
    (run,) = (home / "runs").iterdir()
    return run


def weights(home: Path) -> dict:  # type: ignore[type-arg]
    (model,) = (home / "models" / "k").iterdir()
    return load_file(model / "model.safetensors")


def steps_logged(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def kill_when(proc: subprocess.Popen[str], home: Path, moment: str, rng: random.Random) -> bool:
    """SIGKILL PROC at MOMENT ("random" or "checkpoint-write"); False if it finished first."""
    runs = home / "runs"
    target = rng.randint(1, 8)  # steps to let this process run, at least one
    start_steps = None
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        run_dirs = list(runs.iterdir()) if runs.is_dir() else []
        if run_dirs:
            done = steps_logged(run_dirs[0])
            start_steps = done if start_steps is None else start_steps
            if moment == "checkpoint-write" and list(run_dirs[0].glob(".ckpt-*.tmp")):
                os.kill(proc.pid, signal.SIGKILL)
                return True
            if moment == "random" and done - start_steps >= target:
                time.sleep(rng.uniform(0, 0.05))  # somewhere inside a later step
                os.kill(proc.pid, signal.SIGKILL)
                return True
        time.sleep(0.0005 if moment == "checkpoint-write" else 0.005)
    return False


def test_sigkill_at_random_moments_then_resume_is_bit_exact(data_dir: Path, tmp_path: Path) -> None:
    reference_home = tmp_path / "reference"
    ref = lmforge(*command(data_dir), home=reference_home, timeout=300)
    assert ref.returncode == 0, ref.stderr
    expected = losses(only_run(reference_home))
    assert [s for s, _, _ in expected] == list(range(1, STEPS + 1))

    home = tmp_path / "killed"
    rng = random.Random(1234)
    moments = ["random", "checkpoint-write"] + ["random", "checkpoint-write", "random"] * KILLS
    moments = moments[:KILLS]
    landed = []
    for moment in moments:
        proc = lmforge_popen(
            *command(data_dir), home=home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        killed = kill_when(proc, home, moment, rng)
        proc.wait(timeout=60)
        if killed:
            assert proc.returncode == -signal.SIGKILL
            landed.append(moment)
        else:  # the run got to the end before the moment came
            break
    assert landed == moments, f"only {landed} landed before the run finished"
    final = lmforge(*command(data_dir), home=home, timeout=300)
    assert final.returncode == 0, final.stderr

    run = only_run(home)  # every restart went on with the same run
    assert losses(run) == expected  # every step's train and val loss, bit for bit
    assert not list(run.glob(".ckpt-*.tmp"))  # the next save cleaned nothing up: none was left
    assert sorted(p.name for p in run.glob("ckpt-*.pt")) == [
        f"ckpt-{(STEPS - 1) // 3 * 3:08d}.pt",  # the last --ckpt-every 3 before the end
        f"ckpt-{STEPS:08d}.pt",
    ]
    ours, theirs = weights(home), weights(reference_home)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].equal(theirs[name]), name
