"""`lmforge serve` refuses bad input with one line before starting anything."""

from __future__ import annotations

import socket
import subprocess

import pytest

from conftest import assert_one_line_error


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
