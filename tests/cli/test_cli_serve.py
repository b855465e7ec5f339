"""`lmforge serve` refuses bad input with one line before starting anything."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from conftest import assert_one_line_error, free_port


def _serve(args: list[str], capsys: pytest.CaptureFixture[str]) -> subprocess.CompletedProcess[str]:
    from lmforge.cli.main import main

    code = main(["serve", *args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["lmforge"], code, captured.out, captured.err)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["nosuchmodel"], ("unknown model", "nosuchmodel")),
        (["/no/such/dir"], ("no such file",)),
        (["--port", "0"], ("--port",)),
        (["--port", "70000"], ("--port",)),
        (["--threads", "0"], ("--threads",)),
        (["--dtype", "fp8", "--port", "8002"], ("dtype", "fp8")),
        (["--max-batch", "0", "--port", "8001"], ("max_batch",)),
        (["--host", "no.such.host.invalid"], ("--host",)),
        (["--workers", "0"], ("--workers",)),
        (["--no-auth", "--host", "0.0.0.0"], ("--no-auth", "loopback", "0.0.0.0")),
    ],
)
def test_bad_input_is_one_line(
    args: list[str], needles: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    assert_one_line_error(_serve(args, capsys), *needles)


def test_a_port_in_use_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _serve(["--port", str(port)], capsys)
    assert_one_line_error(proc, "cannot listen", str(port))


def test_an_lstm_model_is_refused_with_one_line(
    tmp_path: Path,
    tiny_tokenizer,
    capsys: pytest.CaptureFixture[str],  # type: ignore[no-untyped-def]
) -> None:
    from lmforge.model.formats import save_model
    from lmforge.model.lstm import LSTMConfig, LSTMLanguageModel

    model = LSTMLanguageModel(LSTMConfig(vocab_size=384, d_model=16, n_layer=1)).eval()
    directory = save_model(model, tiny_tokenizer, tmp_path / "lstm")
    port = free_port()
    # The server starts, the background load fails, the server stops and says why.
    assert_one_line_error(_serve([str(directory), "--port", str(port)], capsys), "LSTM")


def test_a_model_that_fails_to_load_stops_the_server(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tiny_model_dir / "model.safetensors").write_bytes(b"not safetensors")
    port = free_port()
    proc = _serve([str(tiny_model_dir), "--port", str(port)], capsys)
    # The server started (its log lines come first), the background load failed, it stopped.
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "model.safetensors" in last, proc.stderr
