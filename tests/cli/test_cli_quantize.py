"""`lmforge quantize` as a user runs it (in-process): register, then generate and eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_TEXT, assert_one_line_error, lmforge_here, tiny_config


@pytest.fixture
def base_dir(tiny_tokenizer, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    import torch

    from lmforge.model.formats import save_model
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config("llama", d_model=64, tie_embeddings=True))
    return save_model(model, tiny_tokenizer, tmp_path / "base", lineage={"name": "base"})


def test_quantize_registers_a_model_that_generates_and_evaluates(
    capsys, base_dir: Path, tmp_path: Path, lmforge_home: Path
) -> None:  # type: ignore[no-untyped-def]
    args = ["quantize", str(base_dir), "--method", "int4", "--group-size", "64", "--name", "q4"]
    proc = lmforge_here(capsys, *args)
    assert proc.returncode == 0, proc.stderr
    assert "weights on disk" in proc.stdout and "smaller" in proc.stdout
    assert "q4@1" in proc.stdout
    # The registry knows it, with its lineage.
    show = lmforge_here(capsys, "models", "show", "q4", "--json")
    assert show.returncode == 0, show.stderr
    info = json.loads(show.stdout)
    lineage = info["lineage"]
    assert lineage["stage"] == "quantize" and lineage["parent"] == str(base_dir.resolve())
    assert lineage["quantization"] == {
        "method": "int4",
        "bits": 4,
        "group_size": 64,
        "head": "int8",
        "layers": 9,
    }
    assert info["config"]["quantization_config"]["group_size"] == 64
    card = (Path(info["path"]) / "README.md").read_text(encoding="utf-8")
    assert "A language model quantized (int4) from " in card
    assert info["size_bytes"] < sum(f.stat().st_size for f in base_dir.iterdir())
    # generate and eval load it as any model.
    gen = lmforge_here(capsys, "generate", "q4", "The quick brown", "-n", "6", "--json")
    assert gen.returncode == 0, gen.stderr
    assert json.loads(gen.stdout)["usage"]["completion_tokens"] == 6
    text = tmp_path / "held-out.txt"
    text.write_text(TINY_TEXT, encoding="utf-8")
    ev = lmforge_here(capsys, "eval", "q4", "--task", "perplexity", "--data", str(text), "-q")
    assert ev.returncode == 0, ev.stderr
    assert "perplexity" in ev.stdout
    # Its kernels have no backward: fine-tuning (and train --init-from) refuse it up front.
    rows = tmp_path / "rows.tsv"
    rows.write_text("good movie\t1\nbad movie\t0\n", encoding="utf-8")
    args = ["finetune", "--base", "q4", "--task", "classify", "--data", str(rows), "--name", "ft"]
    proc = lmforge_here(capsys, *args)
    assert_one_line_error(proc, "q4@1 is quantized (int4) and cannot be trained")
    # int8 with a float head.
    proc = lmforge_here(capsys, "quantize", "q4", "--method", "int8", "--name", "q8")
    assert_one_line_error(proc, "already quantized")
    proc = lmforge_here(
        capsys, "quantize", str(base_dir), "--method", "int8", "--head", "float", "--name", "q8"
    )
    assert proc.returncode == 0, proc.stderr
    q8 = json.loads(lmforge_here(capsys, "models", "show", "q8", "--json").stdout)
    assert q8["config"]["quantization_config"]["head"] == "float"
    assert "per channel; LM head float" in proc.stdout


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--method", "int3"], ["unknown quantization method 'int3'"]),
        (["--method", "int4", "--group-size", "128"], ["does not divide", "(64)"]),
        (["--method", "int4", "--group-size", "48"], ["group size must be one of"]),
        (["--method", "int8", "--group-size", "64"], ["per output channel"]),
        (["--method", "int4", "--name", "Bad Name!"], ["name"]),
        (["--method", "int8", "--head", "int4"], ["int4 head needs --method int4"]),
        (["--method", "int4", "--head", "int2"], ["unknown head method 'int2'"]),
    ],
    ids=[
        "unknown-method",
        "group-does-not-divide",
        "group-size",
        "int8-group",
        "bad-name",
        "int4-head-with-int8",
        "unknown-head",
    ],
)
def test_bad_input_is_one_line(
    capsys, base_dir: Path, flags: list[str], needles: list[str]
) -> None:  # type: ignore[no-untyped-def]
    name = [] if "--name" in flags else ["--name", "q"]
    proc = lmforge_here(capsys, "quantize", str(base_dir), *flags, *name)
    assert_one_line_error(proc, *needles)


def test_unknown_model_and_help(capsys) -> None:  # type: ignore[no-untyped-def]
    proc = lmforge_here(capsys, "quantize", "no-such-model", "--method", "int8", "--name", "q")
    assert_one_line_error(proc, "unknown model")
    helped = lmforge_here(capsys, "quantize", "--help")
    assert helped.returncode == 0
    assert "Examples" in helped.stdout and "--group-size" in helped.stdout
