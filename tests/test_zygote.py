"""tests/zygote.py, the suite's way of running `lmforge ARGS`, against the way it replaces:
a command forked from the server and the same command started from scratch give the same exit
status, stdout and stderr, with the test's environment, working directory and stdin; a forked
process can be signalled and reports the signal as Popen does; the benches' client passes its
own streams and exit status through."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import zygote
from conftest import LMFORGE, free_port, run_env, tiny_config

pytestmark = pytest.mark.skipif(not zygote.enabled(), reason="LMFORGE_TEST_FORK=0")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    import torch

    from lmforge.model.formats import save_model
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config("llama", max_seq_len=64)).eval()
    return save_model(model, tiny_tokenizer, tmp_path_factory.mktemp("zygote") / "tiny")


CASES = [
    ["models", "list", "--json"],  # reads $LMFORGE_HOME
    ["models", "show", "no-such-model"],  # a one-line error, exit 1
    ["keys", "create", "--name", "Bad/Name"],
    ["generate", "--max-tokens", "-1"],  # a usage error (exit 2)
    ["generate", "MODEL", "-", "-n", "6", "--temperature", "0", "--json"],  # the prompt: stdin
]


@pytest.mark.parametrize("args", CASES, ids=" ".join)
def test_forked_equals_started(
    args: list[str], model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = [str(model_dir) if a == "MODEL" else a for a in args]
    results = []
    for name in ("fresh", "forked"):
        env = run_env(tmp_path / name) | {"COLUMNS": "200"}
        if name == "fresh":
            proc = subprocess.run(
                [*LMFORGE, *args], input="Once upon", capture_output=True, text=True, env=env
            )
        else:
            proc = zygote.run(args, env, "Once upon", timeout=120)
        out = proc.stdout.replace(str(tmp_path / name), "HOME")
        err = proc.stderr.replace(str(tmp_path / name), "HOME")
        if '"timings"' in out:  # generate --json: all but how long it took
            record = json.loads(out)
            out = json.dumps({k: v for k, v in record.items() if k != "timings"})
        results.append((proc.returncode, out, err))
    assert results[0] == results[1]
    assert results[0][1] or results[0][2]  # it said something


def test_a_forked_process_is_signalled_and_reports_it(model_dir: Path, tmp_path: Path) -> None:
    env = run_env(tmp_path)
    args = ["serve", str(model_dir), "--port", str(free_port()), "--threads", "1"]
    process = zygote.popen(args, env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # a server runs until it is stopped
    assert process.poll() is None
    os.kill(process.pid, 0)  # a real process of its own
    assert process.pid != os.getpid()
    process.send_signal(signal.SIGKILL)
    assert process.wait(30) == -signal.SIGKILL
    with pytest.raises(subprocess.TimeoutExpired):  # and a command can time out
        zygote.run(args, env, "", timeout=0.5)


def test_the_bench_client_passes_streams_and_status_through(tmp_path: Path) -> None:
    command, extra = zygote.client_command()
    env = run_env(tmp_path) | extra
    proc = subprocess.run(
        [*command, "models", "show", "no-such-model"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: unknown model 'no-such-model'"), proc.stderr
    assert sys.executable == command[0]
