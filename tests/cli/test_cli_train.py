"""`lmforge train` end to end: a real data set, real processes, the registry, transformers."""

from __future__ import annotations

import json
import resource
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import LMFORGE, assert_one_line_error, lmforge, run_env


def char_text(n_words: int, seed: int) -> str:
    """Sentences of pseudo-words: character statistics a tiny model learns in a few steps."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "de", "po"]
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(n_words)]
    lines, line = [], []
    for i, word in enumerate(words):
        line.append(word)
        if len(line) >= rng.integers(5, 12):
            lines.append(" ".join(line).capitalize() + ("." if i % 3 else "!"))
            line = []
    return "\n".join(lines) + "\n"


def prepare_char(directory: Path, text: str, name: str) -> Path:
    from lmforge.data.prepare import PrepareConfig, prepare

    src = directory / f"{name}.txt"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text(text)
    config = PrepareConfig(
        sources=(str(src),), tokenizer="char", split="tail", val_fraction=0.1, workers=1
    )
    return prepare(config, directory / name).path


@pytest.fixture(scope="session")
def char_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~60 KB character-level data set (train + val)."""
    return prepare_char(tmp_path_factory.mktemp("data"), char_text(10_000, 0), "words")


TINY = ("--batch-size", "4", "--block-size", "32", "--eval-batches", "2", "-q")


def train(
    home: Path, data: Path, *args: str, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    return lmforge("train", "--data", str(data), *args, home=home, timeout=timeout)


def model_dir(home: Path, name: str) -> Path:
    (path,) = (home / "models" / name).iterdir()
    return path


def run_dir(home: Path) -> Path:
    (path,) = (home / "runs").iterdir()
    return path


def test_train_registers_a_model_that_generate_uses(char_data: Path, lmforge_home: Path) -> None:
    proc = train(
        lmforge_home, char_data, "--model", "tiny", "--name", "words", "--max-steps", "30",
        "--eval-every", "10", "--ckpt-every", "10", "--lr", "3e-3", *TINY,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "words@1" in proc.stdout and "val loss" in proc.stdout

    run = run_dir(lmforge_home)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0] - 0.3  # the loss goes down
    assert sorted(p.name for p in run.glob("ckpt-*.pt")) == ["ckpt-00000020.pt", "ckpt-00000030.pt"]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((run / "run.json").read_text())["status"] == "completed"

    lineage = json.loads((model_dir(lmforge_home, "words") / "lmforge.json").read_text())
    assert lineage["run_id"] == run.name
    assert lineage["dataset"]["name"] == "words"
    assert lineage["tokens_seen"] == 30 * 4 * 32
    assert lineage["steps"] == 30
    assert lineage["config"]["loop"]["lr"] == 3e-3
    assert lineage["cpu_seconds"] > 0 and lineage["wall_seconds"] > 0
    assert lineage["eval"]["val_loss"] == pytest.approx(vals[-1])

    listed = lmforge("models", "list", home=lmforge_home)
    assert "words" in listed.stdout
    gen = lmforge("generate", "words", "Ka", "-n", "12", "--seed", "0", home=lmforge_home)
    assert gen.returncode == 0, gen.stderr
    assert len(gen.stdout.rstrip("\n")) == 12  # 12 character tokens


HF_CLASS = {
    "tiny": "LlamaForCausalLM",
    "nanogpt-shakespeare-cpu": "GPT2LMHeadModel",
    "tiny-qwen3": "Qwen3ForCausalLM",
    "tiny-gemma3": "Gemma3ForCausalLM",
}


@pytest.mark.parametrize("preset", list(HF_CLASS))
def test_checkpoint_to_hf_layout_to_transformers(
    preset: str, char_data: Path, lmforge_home: Path
) -> None:
    """The last checkpoint's weights, the exported directory and transformers agree."""
    from transformers import AutoModelForCausalLM

    from lmforge.model.formats import load_model
    from lmforge.train.checkpoints import latest_checkpoint

    proc = train(
        lmforge_home, char_data, "--model", preset, "--name", "m", "--max-steps", "3", *TINY
    )
    assert proc.returncode == 0, proc.stderr
    exported = load_model(model_dir(lmforge_home, "m"))
    found = latest_checkpoint(run_dir(lmforge_home))
    assert found is not None and found[1]["step"] == 3
    from_ckpt = load_model(model_dir(lmforge_home, "m")).model
    from_ckpt.load_state_dict(found[1]["model"])

    ids = torch.tensor([exported.tokenizer.encode("Kalo mine rusa. Tovi depo!")])
    hf = AutoModelForCausalLM.from_pretrained(model_dir(lmforge_home, "m")).eval()
    with torch.no_grad():
        ours = exported.model.eval()(ids)
        reference = hf(ids).logits
        checkpoint = from_ckpt.eval()(ids)
    assert hf.config.architectures[0] == HF_CLASS[preset]
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(checkpoint, ours, atol=0, rtol=0)


def test_config_file_overrides_and_flags_in_order(
    char_data: Path, lmforge_home: Path, tmp_path: Path
) -> None:
    """Flags over --section.field overrides over the YAML file over the defaults."""
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: {char_data}\nmodel: tiny\nname: fromfile\n"
        "loop:\n  max_steps: 9\n  lr: 2e-3\n  batch_size: 4\n  block_size: 32\n"
        "arch:\n  n_layer: 3\n"
    )
    proc = lmforge(
        "train", "--config", str(config), "--loop.max_steps=5", "--arch.n_layer", "1",
        "--max-steps", "4", "--loop.eval_batches=1", "-q", home=lmforge_home,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lineage = json.loads((model_dir(lmforge_home, "fromfile") / "lmforge.json").read_text())
    assert lineage["steps"] == 4  # the flag beat the override, which beat the file
    assert lineage["config"]["loop"]["lr"] == 2e-3  # from the file
    assert lineage["model_config"]["n_layer"] == 1  # the override beat the file
    saved = (run_dir(lmforge_home) / "config.yaml").read_text()
    assert "max_steps: 4" in saved and "n_layer: 1" in saved


def test_time_limit_then_resume_auto_and_changed_settings(
    char_data: Path, lmforge_home: Path
) -> None:
    args = ("--model", "tiny", "--name", "t", "--max-steps", "150", "--ckpt-every", "5", *TINY)
    first = train(lmforge_home, char_data, *args, "--time-limit", "0.2")
    assert first.returncode == 0, first.stderr
    assert "stopped by --time-limit" in first.stderr
    assert not (lmforge_home / "models").exists()  # nothing registered yet
    run = run_dir(lmforge_home)
    assert json.loads((run / "run.json").read_text())["status"] == "stopped"
    stopped_at = len((run / "metrics.jsonl").read_text().splitlines())
    assert 0 < stopped_at < 150

    changed = train(lmforge_home, char_data, *args, "--resume", "auto", "--lr", "0.5")
    assert_one_line_error(changed, "loop.lr", "started with other settings")

    done = train(lmforge_home, char_data, *args, "--resume", "auto")
    assert done.returncode == 0, done.stderr
    assert f"resumed at {stopped_at}" in done.stdout
    assert len(list((lmforge_home / "runs").iterdir())) == 1  # the same run went on
    lineage = json.loads((model_dir(lmforge_home, "t") / "lmforge.json").read_text())
    assert lineage["steps"] == 150 and lineage["tokens_seen"] == 150 * 4 * 32


def test_init_from_continues_a_registered_model(char_data: Path, lmforge_home: Path) -> None:
    base = train(
        lmforge_home, char_data, "--model", "tiny", "--name", "base", "--max-steps", "2", *TINY
    )
    assert base.returncode == 0, base.stderr
    more = train(
        lmforge_home, char_data, "--init-from", "base", "--name", "more", "--max-steps", "2", *TINY
    )
    assert more.returncode == 0, more.stderr
    lineage = json.loads((model_dir(lmforge_home, "more") / "lmforge.json").read_text())
    assert lineage["parent"] == "base@1"
    shown = lmforge("models", "show", "more", home=lmforge_home)
    assert "base@1" in shown.stdout


def test_lstm_trains_and_generates(char_data: Path, lmforge_home: Path) -> None:
    proc = train(
        lmforge_home, char_data, "--model", "lstm", "--name", "rnn", "--max-steps", "3", *TINY
    )
    assert proc.returncode == 0, proc.stderr
    config = json.loads((model_dir(lmforge_home, "rnn") / "config.json").read_text())
    assert config["architectures"] == ["LmforgeLSTMForCausalLM"]
    gen = lmforge("generate", "rnn", "Ka", "-n", "5", home=lmforge_home)
    assert gen.returncode == 0, gen.stderr


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--data", "nosuch", "--model", "tiny", "--name", "x"), ("no data set 'nosuch'",)),
        (
            ("--model", "tyni", "--name", "x"),
            ("unknown model config 'tyni'", "did you mean 'tiny'"),
        ),
        (("--model", "tiny", "--name", "x", "--loop.lrr=1"), ("loop.lrr", "loop.lr")),
        (("--model", "tiny", "--name", "x", "--arch.n_layers=1"), ("arch.n_layers",)),
        (("--model", "tiny", "--name", "x", "--loop.lr=fast"), ("loop.lr",)),
        (("--model", "tiny", "--name", "x", "--batch-size", "0"), ("--batch-size",)),
        (("--model", "tiny", "--name", "Bad Name"), ("invalid model name",)),
        (("--model", "tiny"), ("--name is required",)),
        (
            ("--model", "tiny", "--name", "x", "--block-size", "129"),
            ("longer than the model's context",),
        ),
        (("--model", "tiny", "--name", "x", "--strategy", "ddp"), ("needs torchrun",)),
        (("--model", "tiny", "--name", "x", "--resume", "/nonexistent/ckpt.pt"), ("--resume",)),
    ],
)
def test_bad_input_is_one_line(
    args: tuple[str, ...],
    needles: tuple[str, ...],
    char_data: Path,
    lmforge_home: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """In-process (`main(argv)` is the whole command, without a second of torch import per
    case); the subprocess path of the same error handling is covered by the tests above."""
    from lmforge.cli.main import main

    if args[0] != "--data":
        args = ("--data", str(char_data), *args)
    code = main(["train", *args, "-q"])
    captured = capsys.readouterr()
    proc = subprocess.CompletedProcess(["lmforge"], code, captured.out, captured.err)
    assert_one_line_error(proc, *needles)
    assert not (lmforge_home / "runs").exists() or not any((lmforge_home / "runs").iterdir())


def test_data_smaller_than_one_window(lmforge_home: Path, tmp_path: Path) -> None:
    small = prepare_char(tmp_path, char_text(120, 1), "small")  # val: ~60 characters
    proc = train(lmforge_home, small, "--model", "nanogpt-shakespeare-cpu", "--name", "x", "-q")
    assert_one_line_error(proc, "val split has", "fewer than")


def test_init_from_with_another_vocabulary(
    char_data: Path, lmforge_home: Path, tiny_model_dir: Path
) -> None:
    proc = train(lmforge_home, char_data, "--init-from", str(tiny_model_dir), "--name", "x", "-q")
    assert_one_line_error(proc, "vocabulary", "--init-from")


def test_disk_full_during_checkpoint_leaves_no_torn_file(
    char_data: Path, lmforge_home: Path
) -> None:
    """A file-size limit makes the checkpoint write fail midway, as a full disk would: one clear
    line, no checkpoint or temp file left behind, and the same command then succeeds."""
    args = ("--model", "tiny", "--name", "full", "--max-steps", "6", "--ckpt-every", "3", *TINY)
    weights_bytes = 4 * 110_000  # tiny: ~100 k parameters; a checkpoint holds them 3 times

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 * weights_bytes, 2 * weights_bytes))

    proc = subprocess.run(
        [*LMFORGE, "train", "--data", str(char_data), *args],
        capture_output=True, text=True, env=run_env(lmforge_home), timeout=240,
        preexec_fn=limit, check=False,
    )  # fmt: skip
    assert_one_line_error(proc, "could not write checkpoint", "ckpt-00000003.pt", "too large")
    run = run_dir(lmforge_home)
    assert not list(run.glob("ckpt-*")) and not list(run.glob(".ckpt-*"))
    again = train(lmforge_home, char_data, *args, "--resume", "auto")
    assert again.returncode == 0, again.stderr
    assert (lmforge_home / "models" / "full").is_dir()
