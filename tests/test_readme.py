"""README.zh-CN.md is kept in step with README.md: every command the English README shows
(`lmforge COMMAND [SUBCOMMAND]` and `make TARGET` in its shell blocks) is shown in the Chinese
one too, and every such command exists in the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from lmforge.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"```bash\n(.*?)```", re.S)


def commands(readme: Path) -> set[str]:
    """`lmforge X` / `lmforge GROUP SUB` and `make TARGET` heads of the shell blocks."""
    groups = {g.name for g in app.registered_groups}
    found = set()
    for block in _BLOCK.findall(readme.read_text(encoding="utf-8")):
        block = re.sub(r"(^|\s)#.*$", "", block, flags=re.M)  # comments are prose
        for m in re.finditer(r"\blmforge ([a-z-]+)(?: ([a-z-]+))?", block):
            found.add(f"lmforge {m[1]} {m[2]}" if m[1] in groups and m[2] else f"lmforge {m[1]}")
        found.update(f"make {t}" for t in re.findall(r"^make ([a-z-]+)", block, re.M))
    return found


def test_chinese_readme_shows_every_command_of_the_english_one() -> None:
    english, chinese = commands(ROOT / "README.md"), commands(ROOT / "README.zh-CN.md")
    assert len(english) > 30
    missing = sorted(english - chinese)
    assert not missing, f"README.zh-CN.md lacks: {missing}"


def test_every_readme_command_exists() -> None:
    command = typer.main.get_command(app)
    for text in sorted(commands(ROOT / "README.md") | commands(ROOT / "README.zh-CN.md")):
        words = text.split()[1:]
        if text.startswith("make "):
            assert re.search(rf"^{words[0]}:", (ROOT / "Makefile").read_text(), re.M), text
            continue
        ctx_command = command
        for word in words:
            sub = getattr(ctx_command, "commands", {}).get(word)
            assert sub is not None, f"{text}: no such command"
            ctx_command = sub
