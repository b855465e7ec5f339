"""`lmforge export`: a model as a GGUF file for llama.cpp, or as a Hugging Face directory.

MODEL is resolved as everywhere (registry name, directory, .gguf file, built-in name). GGUF
export writes the family's llama.cpp architecture (`model/formats/gguf_write.py`: llama, qwen2,
qwen3, gemma2, gemma3, phi3); HF export writes the directory
`transformers` loads (`formats.save_model`), so a .gguf or the built-in model becomes an
ordinary HF model. Outputs appear atomically: a killed export leaves no half-written file.
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer
from rich.markup import escape
from rich.table import Table

from lmforge.cli.console import stderr_console, stdout_console
from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    from torch import nn

out = stdout_console()
err = stderr_console()

FORMATS = ("gguf", "hf")
# = gguf_write.GGUF_TYPES, without importing torch early
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")

EXAMPLES = """[bold]Examples[/bold]

  lmforge export smollm2-135m-instruct --format gguf --type q8_0 --out smollm2.Q8_0.gguf

  lmforge export my-model --out my-model.f32.gguf --type f32     # bit-exact weights

  lmforge export smollm2-135m-instruct --format hf --out ./SmolLM2-135M-Instruct

  lmforge export model.Q8_0.gguf --format hf --out ./model-hf --force

[bold]gguf[/bold]: for llama.cpp — Llama, Qwen2, Qwen3, Gemma 2, Gemma 3, OLMo 2, Phi-3 and
SmolLM3 models, and Mistral without sliding-window layers (as llama), as llama.cpp's converter
writes them (norms stay F32).
--type f16 is the default, f32 is exact, bf16 keeps fp32's range, q8_0 is 8-bit.
LoRA adapters: run `lmforge models merge` first. Task (classify/QA) models: --format hf only.
"""


def register(app: typer.Typer) -> None:
    app.command("export", epilog=EXAMPLES)(export_command)


def export_command(
    model: Annotated[
        str, typer.Argument(help="Registry name, model directory, .gguf file or built-in name.")
    ],
    out_path: Annotated[
        Path,
        typer.Option("--out", "-o", help="gguf: the .gguf file to write; hf: a directory."),
    ],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="gguf (llama.cpp) or hf (transformers).")
    ] = "gguf",
    qtype: Annotated[
        str | None,
        typer.Option(
            "--type", help="gguf: f16 (default), f32 (exact), bf16 or q8_0; hf: f32 only."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace --out (a file, or a model directory).")
    ] = False,
) -> None:
    """Write MODEL as a GGUF file (llama.cpp) or a Hugging Face directory (transformers)."""
    from lmforge.cli.models import path_size
    from lmforge.resolve import resolve

    kind = _check_type(fmt, qtype)
    target = out_path.expanduser()
    _check_out(target, fmt, force)
    ref = resolve(model)
    source = Path(ref.path)
    if target.resolve() == source.resolve():
        raise LmforgeError(f"--out {target} is the model being exported")
    start = time.perf_counter()
    if fmt == "gguf":
        _export_gguf(source, target, kind, model)
    else:
        _export_hf(source, target, force, ref.name if ref.kind != "path" else str(source))
    seconds = time.perf_counter() - start
    size = path_size(target)
    table = Table(title=f"{escape(ref.name)} → {fmt}", title_justify="left")
    table.add_column("file", overflow="fold")  # the whole path, wrapped, never cut
    table.add_column("size", justify="right")
    table.add_column("type")
    table.add_column("seconds", justify="right")
    table.add_row(escape(str(target)), f"{size / 1e6:,.1f} MB", kind, f"{seconds:.1f}")
    out.print(table)


def _check_type(fmt: str, qtype: str | None) -> str:
    if fmt not in FORMATS:
        raise LmforgeError(f"unknown --format {fmt!r} (gguf, hf)")
    if fmt == "hf":
        if qtype not in (None, "f32"):
            raise LmforgeError(f"--format hf writes float32 weights; --type {qtype} is for gguf")
        return "f32"
    kind = qtype or "f16"
    if kind not in GGUF_TYPES:
        raise LmforgeError(f"unknown --type {kind!r} ({', '.join(GGUF_TYPES)})")
    return kind


def _check_out(target: Path, fmt: str, force: bool) -> None:
    """Refuse an --out that would be clobbered by accident (before the slow model load)."""
    if fmt == "gguf":
        if target.suffix.lower() != ".gguf":
            raise LmforgeError(f"--out {target} must end in .gguf (how GGUF models are found)")
        if target.is_dir():
            raise LmforgeError(f"--out {target} is a directory; give the .gguf file to write")
        if target.is_file() and target.stat().st_size and not force:
            raise LmforgeError(f"--out {target} exists; add --force to replace it")
        return
    if target.is_file():
        raise LmforgeError(f"--out {target} is a file; --format hf writes a directory")
    if target.is_dir() and any(target.iterdir()):
        if not force:
            raise LmforgeError(f"--out {target} exists and is not empty; add --force to replace it")
        if not (target / "config.json").is_file():
            raise LmforgeError(
                f"--out {target} is not a model directory (no config.json); --force replaces "
                "only a model directory"
            )


def _refuse_adapter(source: Path, spec: str) -> None:
    from lmforge.model.formats import is_adapter

    if source.is_dir() and is_adapter(source):
        raise LmforgeError(
            f"{spec} is a LoRA adapter; merge it into its base first: "
            f"lmforge models merge {spec} --name NAME"
        )


def _export_gguf(source: Path, target: Path, kind: str, spec: str) -> None:
    from lmforge.model.formats import head_of, load_model
    from lmforge.model.formats.gguf_write import GGUFType, export_gguf

    _refuse_adapter(source, spec)
    head = head_of(source)
    if head is not None:
        raise LmforgeError(
            f"{spec} is a {head.task} model (a task head); GGUF holds language models — use "
            "--format hf"
        )
    with err.status(f"loading {spec} …"):
        loaded = load_model(source)
    with err.status(f"writing {target} ({kind}) …"):
        export_gguf(loaded, target, cast(GGUFType, kind))


def _export_hf(source: Path, target: Path, force: bool, origin: str) -> None:
    from lmforge.model.formats import head_of, load_head_model, load_model, save_model
    from lmforge.model.formats.gguf_write import check_exportable

    _refuse_adapter(source, origin)
    model: nn.Module
    with err.status(f"loading {origin} …"):
        if head_of(source) is not None:
            model, tokenizer, lineage = load_head_model(source)
            generation: dict[str, Any] = {}
        else:
            loaded = load_model(source)
            model, tokenizer = loaded.model, loaded.tokenizer
            lineage, generation = loaded.lineage, loaded.generation_config
    check_exportable(model, origin)
    record = {k: v for k, v in lineage.items() if k not in ("weights_sha256", "format_version")}
    record["exported_from"] = origin

    def build(tmp: Path) -> None:
        save_model(model, tokenizer, tmp, lineage=record, generation_config=generation)

    with err.status(f"writing {target} …"):
        _write_dir(target, force, build)


def _write_dir(target: Path, force: bool, build: Callable[[Path], None]) -> None:
    """Build a directory under a temporary name and move it to TARGET (replacing it: --force)."""
    from lmforge.atomic import atomic_directory

    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        with atomic_directory(target) as tmp:
            build(tmp)
        return
    assert force  # _check_out refused otherwise
    token = secrets.token_hex(3)
    staging = target.with_name(f".{target.name}.{token}.new")
    with atomic_directory(staging) as tmp:
        build(tmp)
    old = target.with_name(f".{target.name}.{token}.old")
    target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
