"""What the serving benchmarks share: the lmforge command, a free port, an API key."""

from __future__ import annotations

import atexit
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def lmforge_command() -> list[str]:
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
