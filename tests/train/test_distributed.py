"""torchrun with 2 CPU processes (gloo): DDP and FSDP train, checkpoint and resume, and match
one process with the same global batch within 1e-4 over 20 steps; also as two one-process nodes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port, lmforge, run_env, write_token_dataset

STEPS = 20
pytestmark = pytest.mark.skipif(
    shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
    reason="torchrun is not installed next to this Python",
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:  # type: ignore[no-untyped-def]
    vocab = tiny_tokenizer.vocab_size
    rng = np.random.default_rng(0)
    ids = (np.arange(30_000) * 5 + rng.integers(0, 4, 30_000)) % vocab
    d = tmp_path_factory.mktemp("dist") / "data"
    write_token_dataset(d, {"train": ids[:27_000], "val": ids[27_000:]}, vocab_size=vocab)
    tiny_tokenizer.save(d)
    return d


def args(data: Path, name: str, *extra: str) -> list[str]:
    return [
        "train", "--data", str(data), "--model", "tiny", "--name", name,
        "--max-steps", str(STEPS), "--batch-size", "8", "--block-size", "32", "--grad-accum", "2",
        "--eval-every", "10", "--eval-batches", "2", "--ckpt-every", "5", "-q", *extra,
    ]  # fmt: skip


def torchrun(home: Path, *cli: str) -> subprocess.CompletedProcess[str]:
    runner = str(Path(sys.executable).parent / "torchrun")
    env = run_env(home) | {"OMP_NUM_THREADS": "1"}
    command = [runner, "--standalone", "--nproc-per-node", "2", "-m", "lmforge", *cli]
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def metrics(home: Path) -> list[dict]:  # type: ignore[type-arg]
    (run,) = (home / "runs").iterdir()
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:  # type: ignore[type-arg]
    home = tmp_path_factory.mktemp("single")
    proc = lmforge(*args(data_dir, "one"), home=home, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return metrics(home)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(
    strategy: str,
    data_dir: Path,
    single: list[dict],
    tmp_path: Path,  # type: ignore[type-arg]
) -> None:
    """FSDP runs through; DDP is stopped by --time-limit and resumed with --resume auto (one
    run less than testing the two apart): either way every step matches one process."""
    home = tmp_path / strategy
    if strategy == "ddp":
        first = torchrun(
            home, *args(data_dir, strategy, "--strategy", strategy, "--time-limit", "0.3")
        )
        assert first.returncode == 0, first.stderr[-3000:]
        assert 0 < len(metrics(home)) < STEPS
        proc = torchrun(home, *args(data_dir, strategy, "--strategy", strategy, "--resume", "auto"))
    else:
        proc = torchrun(home, *args(data_dir, strategy, "--strategy", strategy))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = metrics(home)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    ours = np.array([r["loss"] for r in records])
    reference = np.array([r["loss"] for r in single])
    assert np.abs(ours - reference).max() < 1e-4, np.abs(ours - reference).max()
    assert reference[-1] < reference[0]  # and it learned something
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    val_ref = {r["step"]: r["val_loss"] for r in single if "val_loss" in r}
    assert val_ref and all(abs(val[step] - v) < 1e-4 for step, v in val_ref.items())
    (model,) = (home / "models" / strategy).iterdir()  # rank 0 exported and registered once
    lineage = json.loads((model / "lmforge.json").read_text())
    assert lineage["world_size"] == 2 and lineage["strategy"] == strategy
    assert lineage["tokens_seen"] == STEPS * 8 * 32 * 2


def test_two_nodes_rendezvous_as_the_readme_shows(
    data_dir: Path,
    single: list[dict],
    tmp_path: Path,  # type: ignore[type-arg]
) -> None:
    """Two torchrun launchers as two nodes of one process each (`--nnodes 2`, c10d rendezvous
    on 127.0.0.1), sharing $LMFORGE_HOME: the same run as two processes on one node."""
    port = free_port()
    home = tmp_path / "nodes"
    runner = str(Path(sys.executable).parent / "torchrun")
    env = run_env(home) | {"OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [
                *(runner, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1"),
                *("--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"),
                *("--rdzv-id", "lmforge-test", "-m", "lmforge"),
                *args(data_dir, "nodes", "--strategy", "ddp"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        _, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr[-3000:]
    records = metrics(home)
    ours = np.array([r["loss"] for r in records])
    reference = np.array([r["loss"] for r in single])
    assert len(ours) == STEPS and np.abs(ours - reference).max() < 1e-4
    (model,) = (home / "models" / "nodes").iterdir()
    assert json.loads((model / "lmforge.json").read_text())["world_size"] == 2
