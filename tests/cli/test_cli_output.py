"""What commands print stays whole: paths, ids and keys are never split across lines.

The commands that print paths, ids and keys run with `COLUMNS=40` and a `$LMFORGE_HOME` more than
200 characters deep, through a pipe and (the read-only ones) in a pseudo-terminal; every path
in that deep folder must be whole on one line. One process runs
each chain of commands (`main(argv)` in turn), so the test costs one start-up per chain.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from conftest import run_env, syllable_text

DRIVER = r"""
import json, sys
from lmforge.cli.main import main
for argv in json.loads(sys.argv[1]):
    print("=== " + " ".join(argv), flush=True)
    code = main(argv)
    sys.stdout.flush(); sys.stderr.flush()
    print(f"=== exit {code}", flush=True)
"""

# CSI and OSC sequences, carriage returns: what a terminal interprets rather than shows.
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)|\r")


def _long_home(tmp_path: Path) -> Path:
    home = tmp_path
    for i in range(9):
        home = home / f"a-rather-long-directory-name-{i}"
    home = home / "lmforge-home"
    assert len(str(home)) > 200
    return home


def _run_piped(home: Path, commands: list[list[str]]) -> tuple[str, str]:
    env = {**run_env(home), "COLUMNS": "40", "LINES": "20"}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(commands)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "=== exit 1" not in proc.stdout, proc.stdout + proc.stderr
    return proc.stdout, proc.stderr


def _run_in_terminal(home: Path, commands: list[list[str]]) -> str:
    """The commands with stdout and stderr on a pseudo-terminal (rich sees a terminal)."""
    env = {**run_env(home), "COLUMNS": "40", "LINES": "20", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    main_fd, child_fd = pty.openpty()
    with open(os.devnull) as devnull:
        proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, json.dumps(commands)],
            stdin=devnull,
            stdout=child_fd,
            stderr=child_fd,
            env=env,
        )
    os.close(child_fd)
    chunks = []
    while True:
        ready, _, _ = select.select([main_fd], [], [], 120)
        if not ready:
            proc.kill()
            pytest.fail("no output from the commands for 120 s")
        try:
            data = os.read(main_fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(main_fd)
    assert proc.wait(timeout=60) == 0
    return _CONTROL.sub("", b"".join(chunks).decode("utf-8", "replace"))


def _assert_whole(output: str, *words: str) -> None:
    """Each command exited 0; every line that starts a path in the home has all of the home;
    each of WORDS (paths, ids, keys) appears whole on one line."""
    lines = output.splitlines()
    failed = [line for line in lines if line.startswith("=== exit ") and line != "=== exit 0"]
    assert not failed, output
    for word in words:
        assert any(word in line for line in lines), f"{word!r} is not whole on a line:\n{output}"


def _assert_deep_paths_whole(output: str, deep: Path) -> int:
    """Every occurrence of DEEP's first 30 characters (a path in the test's deep folder: the
    home, the source file, the export) continues into the whole of DEEP on the same line;
    returns how many there are."""
    head, count = str(deep)[:30], 0
    for line in output.splitlines():
        if line.startswith("=== "):  # the driver's own lines
            continue
        for match in re.finditer(re.escape(head), line):
            assert line.startswith(str(deep), match.start()), f"a path was cut:\n{line}"
            count += 1
    return count


def test_paths_ids_and_keys_are_never_split(tmp_path: Path) -> None:
    home = _long_home(tmp_path)
    src = home.parent / "input.txt"
    src.parent.mkdir(parents=True)
    src.write_text(syllable_text(400), encoding="utf-8")
    exported = home.parent / "exported-words"
    tiny = ["--batch-size", "4", "--block-size", "32", "--eval-batches", "1", "-q"]
    chain = [
        ["data", "prepare", str(src), "--name", "fox", "--tokenizer", "char", "--split", "tail"],
        ["data", "prepare", str(src), "--name", "fox", "--tokenizer", "char", "--split", "tail"],
        ["data", "list"],
        ["data", "show", "fox"],
        ["train", "--data", "fox", "--model", "tiny", "--name", "words", "--max-steps", "2",
         "--arch.n_layer", "1", *tiny],
        ["models", "list"],
        ["models", "show", "words"],
        ["quantize", "words", "--method", "int8", "--name", "words-q8"],
        ["export", "words", "--format", "hf", "--out", str(exported)],
        ["lineage", "words-q8"],
        ["keys", "create", "--name", "alice"],
        ["keys", "list"],
    ]  # fmt: skip
    stdout, stderr = _run_piped(home, chain)
    both = stdout + "\n" + stderr
    key = next(line for line in stdout.splitlines() if line.startswith("lmf-"))
    runs = home / "runs"
    (run_id,) = [p.name for p in runs.iterdir()]
    dataset = home / "datasets" / "fox"
    _assert_whole(
        both,
        str(src),
        str(dataset),
        str(dataset / "token_lengths.png"),
        str(exported),
        run_id,
        key,
        key[:12],
    )
    assert _assert_deep_paths_whole(both, home.parent) >= 10
    for word in ("words", "words-q8"):  # the registry's model paths, as `models show` prints
        info = subprocess.run(
            [sys.executable, "-m", "lmforge.cli.main", "models", "show", word, "--json"],
            capture_output=True,
            text=True,
            env=run_env(home),
            check=True,
        )
        _assert_whole(both, json.loads(info.stdout)["path"])

    shown = _run_in_terminal(
        home,
        [
            ["data", "show", "fox"],
            ["data", "list"],
            ["models", "list"],
            ["models", "show", "words-q8"],
            ["lineage", "words-q8"],
            ["keys", "list"],
        ],
    )
    _assert_whole(shown, str(dataset / "token_lengths.png"), str(src), key[:12])
    assert _assert_deep_paths_whole(shown, home.parent) >= 5


def test_commands_build_no_console_of_their_own() -> None:
    """Every command prints through `lmforge.cli.console` (the one place that decides wrapping)."""
    folder = Path(__file__).parents[2] / "src" / "lmforge" / "cli"
    offenders = [
        p.name
        for p in folder.glob("*.py")
        if p.name != "console.py" and re.search(r"\bConsole\(", p.read_text(encoding="utf-8"))
    ]
    assert offenders == []


def _help_texts(command: object, path: str = "lmforge") -> list[tuple[str, str]]:
    texts: list[tuple[str, str]] = []
    for text in (command.help, command.epilog, command.short_help):  # type: ignore[attr-defined]
        if text:
            texts.append((path, text))
    for param in command.params:  # type: ignore[attr-defined]
        if getattr(param, "help", None):
            texts.append((f"{path} {param.name}", param.help))  # type: ignore[attr-defined]
    for name, sub in getattr(command, "commands", {}).items():
        texts += _help_texts(sub, f"{path} {name}")
    return texts


def test_help_text_keeps_its_square_brackets() -> None:
    """rich markup would eat `[ray]` in `pip install 'lmforge[ray]'`: every bracketed word in
    help text is either a style (`[bold]`) or escaped (`\\[ray]`)."""
    from rich.errors import StyleSyntaxError
    from rich.markup import RE_TAGS
    from rich.style import Style

    from lmforge.cli.main import app

    eaten = []
    for where, text in _help_texts(typer.main.get_command(app)):
        for match in RE_TAGS.finditer(text):
            escapes, tag = match.group(2), match.group(3)
            if len(escapes) % 2 or tag.startswith(("/", "link")):
                continue
            try:
                Style.parse(tag)
            except StyleSyntaxError:
                eaten.append(f"{where}: [{tag}]")
    assert eaten == []
