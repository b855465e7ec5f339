"""Where lmforge keeps its artifacts: `$LMFORGE_HOME`, default `~/.lmforge`."""

from __future__ import annotations

import os
from pathlib import Path


def lmforge_home() -> Path:
    return Path(os.environ.get("LMFORGE_HOME") or Path.home() / ".lmforge")
