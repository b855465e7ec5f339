"""Atomic writes: the result appears whole, with the modes a plain open()/mkdir would give."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lmforge.atomic import atomic_directory, write_text_atomic, write_with


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_files_and_directories_get_the_default_modes_not_the_temporaries(tmp_path: Path) -> None:
    # Regression: mkstemp/mkdtemp made every artifact owner-only (0600/0700), so an exported
    # GGUF could not be read by a llama.cpp running as another user.
    write_text_atomic(tmp_path / "a.txt", "hello")
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~_umask()
    with atomic_directory(tmp_path / "model") as d:
        (d / "weights").write_bytes(b"x")
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o777 & ~_umask()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    write_text_atomic(target, "old")

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_with(target, broken)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]
