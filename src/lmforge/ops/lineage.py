"""Lineage: from a served request, or a model, back to the files it was trained on.

    request req-…  (ledger row: key, endpoint, status, tokens, cost, time)
    └── model words@2  (path, weights sha256)
        ├── run words-20250101-…  (steps, tokens, compute seconds)
        │   └── data set words  (content key, manifest sha256)
        │       ├── source /data/words.txt  (sha256, documents)
        │       └── tokenizer char  (vocab, sha256)
        └── model words@1  (the parent: `--init-from`), … down to
            └── model smollm2-135m-instruct (built-in) └── gguf SmolLM2-135M-Instruct.Q4_1.gguf

Everything is read from what the stages recorded: a model directory's `lmforge.json`, the
registry's `models` and `datasets` rows, a data set's `manifest.json`, a run's `run.json`. An
artifact that is gone (a deleted run, a re-prepared data set, a moved source file) becomes a node
marked `missing` with the reason; only an unknown model spec or request id is an error.

torch-free: nothing is loaded, only JSON files and the registry are read (the built-in model's
GGUF file is hashed when its converted copy has not recorded its hash yet).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from lmforge.builtin import BUILTINS
from lmforge.errors import LmforgeError, ModelNotFoundError
from lmforge.home import lmforge_home
from lmforge.ops.pricing import format_price, format_usd
from lmforge.registry import ledger, repo
from lmforge.registry.db import read_existing

LINEAGE_FILE = "lmforge.json"  # model/formats/hf.py's LINEAGE_FILE (not imported: torch)
WEIGHTS_FILE = "model.safetensors"
_REGISTRY_REF = re.compile(r"^(?P<name>[a-z0-9][a-z0-9._-]{0,63})(?:@(?P<version>\d+))?$")
_VERSION = re.compile(r"^(?P<name>.+)@(?:(?P<number>\d+)|sha256:(?P<hex>[0-9a-f]{1,64}))$")
_MAX_DEPTH = 16  # parents followed at most (a parent chain that loops is cut here)


@dataclass
class LineageNode:
    """One artifact in a lineage tree."""

    kind: str  # "request" | "model" | "run" | "dataset" | "source" | "tokenizer" | "gguf"
    label: str
    details: dict[str, str] = field(default_factory=dict)
    children: list[LineageNode] = field(default_factory=list)
    missing: str | None = None  # why the artifact cannot be found; None when it was

    def walk(self) -> Iterator[LineageNode]:
        """This node and every node below it, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "label": self.label, "details": self.details}
        if self.missing is not None:
            out["missing"] = self.missing
        out["children"] = [c.to_dict() for c in self.children]
        return out


@dataclass(frozen=True)
class ModelFacts:
    """A model found from a spec without loading it: what it is and what it recorded."""

    label: str  # "name@3", the built-in name, or the directory as given
    kind: str  # "registry" | "builtin" | "path"
    path: Path | None  # the model directory (built-in: its converted copy, if made)
    record: dict[str, Any]  # its lmforge.json ({} when it has none)
    registry: repo.ModelRecord | None = None
    gguf: Path | None = None  # built-in: the shipped GGUF file
    missing: str | None = None  # why its directory cannot be read

    @property
    def name(self) -> str:
        """The name the server serves it under and records in the ledger's `model`, and that
        prices are keyed by: no version, a directory's base name (`serve.state.load_served`)."""
        if self.registry is not None:
            return self.registry.name
        if self.kind == "path" and self.path is not None:
            return self.path.stem
        return self.label

    @property
    def weights_sha256(self) -> str | None:
        if self.registry is not None:
            return self.registry.sha256
        sha = self.record.get("weights_sha256")
        return sha if isinstance(sha, str) else None

    @property
    def version(self) -> str:
        """The ledger's `model_version` for it: "name@3" or "name@sha256:<12 hex>"."""
        if self.registry is not None:
            return self.registry.ref
        return f"{self.name}@sha256:{(self.weights_sha256 or '?' * 12)[:12]}"


# -- finding models ----------------------------------------------------------------------------


def find_model(spec: str, *, home: Path | None = None) -> ModelFacts:
    """The model SPEC names: a built-in name, a model directory, or a registry `name[@N]`.

    The same order as `lmforge.resolve` (which this layer may not import), without converting
    the built-in model. Raises `ModelNotFoundError` when SPEC names nothing.
    """
    home = home or lmforge_home()
    spec = spec.strip()
    if spec in BUILTINS:
        return _builtin(spec, home)
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelFacts(spec, "path", path, read_json_object(path / LINEAGE_FILE))
    if path.exists():
        raise LmforgeError(f"{spec}: lineage needs a model directory, not a file")
    m = _REGISTRY_REF.match(spec)
    if m:
        with read_existing(home=home) as conn:
            if conn is not None:
                version = int(m["version"]) if m["version"] else None
                rec = repo.get_model(conn, name=m["name"], version=version)
                if rec is not None:
                    return _registry(rec)
                if version is not None and repo.get_model(conn, name=m["name"]):
                    raise ModelNotFoundError(f"model {m['name']!r} has no version {version}")
            known = sorted(set(BUILTINS) | set(repo.model_names(conn) if conn else []))
    else:
        known = sorted(BUILTINS)
    raise ModelNotFoundError(f"unknown model {spec!r}; known models: {', '.join(known[:8])}")


def model_chain(facts: ModelFacts, *, home: Path | None = None) -> list[ModelFacts]:
    """FACTS and its ancestors (parent, grandparent, …), as far as they can be found."""
    chain = [facts]
    while len(chain) < _MAX_DEPTH:
        parent = _parent_spec(chain[-1])
        if parent is None:
            break
        try:
            chain.append(find_model(parent, home=home))
        except LmforgeError:
            break
    return chain


def _builtin(name: str, home: Path) -> ModelFacts:
    spec = BUILTINS[name]
    gguf = spec.assembled_gguf(home)  # never assembles: a chunked one not yet used is absent
    cache = home / "builtin" / name
    record = read_json_object(cache / LINEAGE_FILE)
    missing = spec.unavailable()
    return ModelFacts(
        name, "builtin", cache if record else None, record, gguf=gguf, missing=missing
    )


def _registry(rec: repo.ModelRecord) -> ModelFacts:
    path = Path(rec.path)
    missing = None if path.is_dir() else f"registered at {path}, now gone"
    record = read_json_object(path / LINEAGE_FILE)
    return ModelFacts(rec.ref, "registry", path, record, registry=rec, missing=missing)


def _parent_spec(facts: ModelFacts) -> str | None:
    parent = facts.record.get("parent") or (facts.registry.parent if facts.registry else None)
    return str(parent) if parent else None


# -- model lineage -----------------------------------------------------------------------------


def model_lineage(spec: str, *, home: Path | None = None) -> LineageNode:
    """The lineage tree of model SPEC (registry `name[@N]`, directory or built-in name)."""
    home = home or lmforge_home()
    return _model_node(find_model(spec, home=home), home, depth=0)


def _model_node(
    facts: ModelFacts, home: Path, *, depth: int, seen: frozenset[str] = frozenset()
) -> LineageNode:
    if facts.kind == "builtin":
        return _builtin_node(facts)
    rec, reg = facts.record, facts.registry
    details = {"kind": facts.kind, "path": str(facts.path)}
    sha = facts.weights_sha256
    if sha:
        details["weights sha256"] = sha
    if reg is not None:
        if reg.arch:
            details["arch"] = reg.arch
        if reg.n_params:
            details["params"] = f"{reg.n_params:,}"
        details["registered"] = reg.created_at
        recorded = rec.get("weights_sha256")
        if recorded and recorded != reg.sha256 and facts.missing is None:
            details["warning"] = f"lmforge.json says weights sha256 {recorded}"
    node = LineageNode("model", facts.label, details, missing=facts.missing)
    if facts.missing is None and not rec:
        node.details["note"] = "no lmforge.json: made outside lmforge"
    if "run_id" in rec:
        node.children.append(_run_node(rec, home))
    elif isinstance(rec.get("source"), dict):
        node.children.append(_source_node(rec["source"]))
    parent = _parent_spec(facts)
    if parent is not None:
        node.children.append(_parent_node(parent, home, depth, seen | {facts.label}))
    return node


def _parent_node(spec: str, home: Path, depth: int, seen: frozenset[str]) -> LineageNode:
    if spec in seen or depth + 1 >= _MAX_DEPTH:
        return LineageNode("model", spec, {"role": "parent"}, missing="parent chain loops")
    try:
        facts = find_model(spec, home=home)
    except LmforgeError as exc:
        return LineageNode("model", spec, {"role": "parent"}, missing=str(exc))
    node = _model_node(facts, home, depth=depth + 1, seen=seen)
    node.details = {"role": "parent", **node.details}
    return node


def _builtin_node(facts: ModelFacts) -> LineageNode:
    spec = BUILTINS[facts.label]
    details = {"kind": "built-in", "package": " ".join(spec.packages), "about": spec.description}
    if facts.weights_sha256:
        details["weights sha256"] = facts.weights_sha256
        details["converted copy"] = str(facts.path)
    node = LineageNode("model", facts.label, details, missing=facts.missing)
    if facts.gguf is None:
        why = facts.missing or "not assembled yet (its first use assembles it)"
        gguf_details = {"sha256": spec.sha256} if facts.missing is None else {}
        node.children.append(LineageNode("gguf", spec.filename, gguf_details, missing=why))
        return node
    node.children.append(
        LineageNode(
            "gguf",
            str(facts.gguf),
            {
                "size": f"{facts.gguf.stat().st_size:,} bytes",
                "sha256": str(_builtin_gguf_sha256(facts)),
                "not trained here": "the weights come from the package",
            },
        )
    )
    return node


def _builtin_gguf_sha256(facts: ModelFacts) -> str | None:
    """The sha256 of the built-in's GGUF: as its converted copy recorded it, else hashed now."""
    if facts.gguf is None:
        return None
    source = facts.record.get("source") or {}
    stat = facts.gguf.stat()
    if source.get("gguf_size") == stat.st_size and source.get("gguf_mtime_ns") == stat.st_mtime_ns:
        return str(source.get("sha256"))
    return _file_sha256(facts.gguf)


def _source_node(source: dict[str, Any]) -> LineageNode:
    """Where an imported model came from (`lmforge models import`)."""
    path = Path(str(source.get("path")))
    details = {"kind": str(source.get("kind", "?"))}
    if source.get("sha256"):
        details["sha256"] = str(source["sha256"])
    missing = None if path.exists() else "no longer there"
    return LineageNode(
        "gguf" if details["kind"] == "gguf" else "source", str(path), details, missing=missing
    )


def _run_node(rec: dict[str, Any], home: Path) -> LineageNode:
    wall = float(rec.get("wall_seconds") or 0)
    world = int(rec.get("world_size") or 1)
    details = {
        "dir": str(rec.get("run_dir")),
        "stage": str(rec.get("stage", "?")),
        "steps": f"{rec.get('steps', 0):,}",
        "tokens seen": f"{rec.get('tokens_seen', 0):,}",
        "wall": f"{wall:,.1f} s",
        "world size": str(world),
        "compute": f"{wall * world:,.1f} s (wall × world size)",
        "cpu": f"{float(rec.get('cpu_seconds') or 0):,.1f} s",
        "gpu": f"{float(rec.get('gpu_seconds') or 0):,.1f} s",
    }
    val = (rec.get("eval") or {}).get("val_loss")
    if val is not None:
        details["val loss"] = f"{val:.4f}"
    run_dir = Path(str(rec.get("run_dir")))
    missing = None
    if (run_dir / "run.json").is_file():
        details["status"] = str(read_json_object(run_dir / "run.json").get("status", "?"))
    else:
        missing = f"run directory {run_dir} is gone (the numbers are from lmforge.json)"
    node = LineageNode("run", str(rec["run_id"]), details, missing=missing)
    node.children.append(_dataset_node(rec.get("dataset") or {}, home))
    return node


def _dataset_node(recorded: dict[str, Any], home: Path) -> LineageNode:
    name = str(recorded.get("name") or "?")
    key = recorded.get("content_key")
    path = Path(str(recorded.get("path")))
    details = {"path": str(path), "content key": str(key)}
    with read_existing(home=home) as conn:
        row = repo.get_dataset(conn, name=name) if conn is not None else None
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        return LineageNode("dataset", name, details, missing=f"{manifest_file} is gone")
    manifest = read_json_object(manifest_file)
    details["manifest sha256"] = _file_sha256(manifest_file)
    if (
        row is not None
        and row.content_key == key
        and row.manifest_sha256 != details["manifest sha256"]
    ):
        details["warning"] = f"the registry recorded manifest sha256 {row.manifest_sha256}"
    if manifest.get("content_key") != key:
        return LineageNode(
            "dataset",
            name,
            details,
            missing=f"re-prepared since (now content key {manifest.get('content_key')}): "
            "the training data is gone",
        )
    funnel = manifest.get("funnel") or [{}]
    details["documents"] = f"{funnel[-1].get('documents', 0):,}"
    details["tokens"] = f"{sum(s.get('tokens', 0) for s in manifest.get('splits', {}).values()):,}"
    if row is None:
        details["registry"] = "not registered"
    node = LineageNode("dataset", name, details)
    for source in manifest.get("sources") or []:
        node.children.append(_data_source_node(source))
    tok = manifest.get("tokenizer") or {}
    node.children.append(
        LineageNode(
            "tokenizer",
            str(tok.get("source") or tok.get("kind", "?")),
            {
                "kind": str(tok.get("kind", "?")),
                "vocab size": f"{tok.get('vocab_size', 0):,}",
                "sha256": str(tok.get("sha256", "?")),
                "file": str(path / "tokenizer.json"),
            },
        )
    )
    return node


def _data_source_node(source: dict[str, Any]) -> LineageNode:
    path = Path(str(source.get("path")))
    details = {
        "sha256": str(source.get("sha256")),
        "bytes": f"{source.get('bytes', 0):,}",
        "documents": f"{source.get('documents_kept')} kept of {source.get('documents_read')}",
    }
    missing = None
    if not path.is_file():
        missing = "no longer there"
    elif path.stat().st_size != source.get("bytes"):
        missing = f"changed since (now {path.stat().st_size:,} bytes)"
    return LineageNode("source", str(path), details, missing=missing)


# -- request lineage ---------------------------------------------------------------------------


def request_lineage(request_id: str, *, home: Path | None = None) -> LineageNode:
    """The ledger row of REQUEST_ID → the model version that served it → its lineage."""
    home = home or lmforge_home()
    row, facts = None, None
    with read_existing(home=home) as conn:
        if conn is not None:
            row = ledger.get_usage(conn, request_id=request_id)
            facts = None if row is None else _served_model(conn, row, home)
    if row is None or facts is None:
        raise LmforgeError(f"unknown request id {request_id!r}: it is not in the usage ledger")
    details = {
        "key": row.key_name or "(no key)",
        "endpoint": row.endpoint,
        "status": f"{row.status} (HTTP {row.http_status})",
        "tokens": f"{row.prompt_tokens:,} prompt + {row.completion_tokens:,} completion",
        "cost": format_usd(row.cost_nusd, places=9),
        "time": row.created_at,
        "latency": f"{row.latency_ms:,.0f} ms",
        "model": str(row.model),
        "model version": str(row.model_version),
    }
    if row.price_input is not None and row.price_output is not None:
        details["price"] = (
            f"{format_price(row.price_input)} in / {format_price(row.price_output)} out per Mtok"
        )
    node = LineageNode("request", row.request_id, details)
    if isinstance(facts, str):
        node.children.append(LineageNode("model", str(row.model_version), missing=facts))
    else:
        node.children.append(_model_node(facts, home, depth=0))
    return node


def _served_model(conn: Connection, row: ledger.UsageRecord, home: Path) -> ModelFacts | str:
    """The model version ROW was served by, or why it cannot be found."""
    m = _VERSION.match(row.model_version or "")
    if m is None:
        return f"the ledger row names no model version ({row.model_version!r})"
    name = m["name"]
    if m["number"] is not None:
        rec = repo.get_model(conn, name=name, version=int(m["number"]))
        return (
            _registry(rec) if rec is not None else f"the registry has no model {row.model_version}"
        )
    prefix = m["hex"]
    if name in BUILTINS:
        facts = _builtin(name, home)
        hashes = [facts.weights_sha256, _builtin_gguf_sha256(facts)]  # either may be the one
        if any(h and h.startswith(prefix) for h in hashes):
            return facts
        return f"the built-in {name} here is not the one that served it (weights sha256 {prefix}…)"
    for model_name in repo.model_names(conn):  # a directory model that is also registered
        for rec in repo.list_versions(conn, name=model_name):
            if rec.sha256.startswith(prefix):
                return _registry(rec)
    return f"directory model {name} (weights sha256 {prefix}…) is not registered: path unknown"


# -- files -------------------------------------------------------------------------------------


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in PATH; {} when it is missing, unreadable or not an object (a record
    that cannot be read is shown as absent, never as a crash)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
