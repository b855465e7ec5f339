"""Deserialization and path safety: hostile files and names given to real commands.

- a checkpoint whose pickle would run code when unpickled (`train --resume FILE`);
- safetensors files with a huge header length, a header that is not JSON, tensors whose data
  overlap or run past the end of the file;
- `../`, absolute and odd names in every command that takes a name.

Each is refused in one line (exit ≠ 0, no traceback), the payload never runs, and nothing is
written outside $LMFORGE_HOME."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import assert_one_line_error, lmforge_here, tiny_config

MARKER = "lmforge-pwned"


class Payload:
    """Unpickling this calls os.system: a checkpoint that would run code if loaded unsafely."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.target}",))


def files_outside(root: Path, home: Path) -> set[Path]:
    return {p for p in root.rglob("*") if home not in p.parents and p != home}


def test_a_pickle_payload_in_a_checkpoint_is_refused_and_never_runs(
    tmp_path: Path, lmforge_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / MARKER
    evil = tmp_path / "ckpt-00000010.pt"
    torch.save({"model": Payload(marker), "step": 10}, evil)  # a real pickle with the payload
    proc = lmforge_here(capsys, "train", "--data", "nowhere", "--model", "tiny", "--name", "x",
                        "--resume", str(evil))  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert not marker.exists(), "the pickle payload ran"


def _safetensors(path: Path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def _model_dir(root: Path, tokenizer: Any) -> Path:
    from lmforge.model.formats import save_model
    from lmforge.model.transformer import Transformer

    return save_model(Transformer(tiny_config("llama")).eval(), tokenizer, root / "m")


@pytest.mark.parametrize(
    ("name", "write", "needle"),
    [
        ("huge header", lambda p: p.write_bytes(struct.pack("<Q", 2**60) + b"{}"), "safetensors"),
        ("not json", lambda p: _safetensors(p, b"\xff" * 16), "safetensors"),
        ("overlap", lambda p: _safetensors(p, json.dumps({
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        }).encode(), b"\0" * 12), "safetensors"),
        ("past the end", lambda p: _safetensors(p, json.dumps({
            "a": {"dtype": "F32", "shape": [1000000], "data_offsets": [0, 4000000]},
        }).encode(), b"\0" * 16), "safetensors"),
        ("shape lies", lambda p: _safetensors(p, json.dumps({
            "a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]},
        }).encode(), b"\0" * 8), "safetensors"),
    ],
)  # fmt: skip
def test_hostile_safetensors_are_refused_in_one_line(
    name: str, write: Any, needle: str, tmp_path: Path, tiny_tokenizer: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    directory = _model_dir(tmp_path, tiny_tokenizer)
    write(directory / "model.safetensors")
    assert_one_line_error(lmforge_here(capsys, "generate", str(directory), "hi", "-n", "2"))


NAME_COMMANDS: list[list[str]] = [
    ["data", "prepare", "{src}", "--name", "{name}", "--tokenizer", "char"],
    ["train", "--data", "{name}", "--model", "tiny", "--name", "ok"],
    ["train", "--data", "ok", "--model", "tiny", "--name", "{name}"],
    ["models", "import", "{model}", "--name", "{name}"],
    ["models", "show", "{name}"],
    ["models", "price", "{name}", "--input", "1", "--output", "1"],
    ["models", "promote", "{name}", "--alias", "prod"],
    ["models", "rollback", "{name}"],
    ["keys", "create", "--name", "{name}"],
    ["keys", "revoke", "{name}"],
    ["quantize", "{model}", "--method", "int8", "--name", "{name}"],
    ["finetune", "--base", "{model}", "--task", "sft", "--data", "{src}", "--name", "{name}"],
    ["generate", "{name}", "hello"],
    ["lineage", "{name}"],
    ["data", "show", "{name}"],
]
HOSTILE_NAMES = ["../evil", "../../evil", "/tmp/evil", "evil/../../x", ".hidden", "a\x00b",
                 "UPPER", "x" * 65]  # fmt: skip


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_in_every_command_are_refused_and_write_nothing_outside_home(
    name: str, tmp_path: Path, lmforge_home: Path, tiny_tokenizer: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    src = tmp_path / "text.txt"
    src.write_text("hello world. " * 200)
    model = _model_dir(tmp_path, tiny_tokenizer)
    before = files_outside(tmp_path, lmforge_home)
    for template in NAME_COMMANDS:
        argv = [a.format(name=name, src=src, model=model) for a in template]
        proc = lmforge_here(capsys, *argv)
        assert proc.returncode != 0, argv
        assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, (argv, proc.stderr)
    assert files_outside(tmp_path, lmforge_home) == before
    assert not Path("/tmp/evil").exists()
