"""What the benchmarks share: the lmforge command, a free port, an API key, a tiny model."""

from __future__ import annotations

import atexit
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

COMMAND_ENV = "LMFORGE_BENCH_COMMAND"


def lmforge_command() -> list[str]:
    """How the benches start lmforge: $LMFORGE_BENCH_COMMAND (a shell-quoted command line;
    make test's smoke runs set it), else the console script next to this Python."""
    if os.environ.get(COMMAND_ENV):
        return shlex.split(os.environ[COMMAND_ENV])
    script = Path(sys.executable).parent / "lmforge"
    if script.exists():
        return [str(script)]
    found = shutil.which("lmforge")
    return [found] if found else [sys.executable, "-m", "lmforge"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_key(prefix: str) -> str:
    """A new API key in $LMFORGE_HOME (`lmforge serve` needs one; it is revoked at exit)."""
    name = f"{prefix}-{int(time.time() * 1000)}"
    out = subprocess.run(
        [*lmforge_command(), "keys", "create", "--name", name, "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    revoke = [*lmforge_command(), "keys", "revoke", name]
    atexit.register(subprocess.run, revoke, capture_output=True, check=False)
    return str(json.loads(out)["key"])


def smoke_model(folder: Path, max_seq_len: int = 256) -> Path:
    """A tiny random Llama with a byte-level tokenizer, in the Hugging Face layout: what the
    benches' `--smoke` runs use instead of a real model (seconds, not minutes, in make test)."""
    import torch

    from lmforge.model.config import ModelConfig
    from lmforge.model.formats import save_model
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer.bpe import byte_tokenizer

    torch.manual_seed(0)
    config = ModelConfig(
        arch="llama", vocab_size=320, d_model=64, n_layer=2, n_head=4, n_kv_head=2,
        max_seq_len=max_seq_len,
    )  # fmt: skip
    return save_model(Transformer(config), byte_tokenizer(), folder / "tiny-llama")
