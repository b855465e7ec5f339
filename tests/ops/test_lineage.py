"""`lmforge lineage`: a served request traced back through real `data prepare` and `train` runs
to the source files, and every missing artifact shown as such instead of a crash."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import assert_one_line_error, lmforge, syllable_text, tiny_config
from lmforge.builtin import BUILTINS
from lmforge.cli.main import main
from lmforge.errors import LmforgeError
from lmforge.ops.lineage import LineageNode, model_lineage, request_lineage
from lmforge.registry import ledger, repo
from lmforge.registry.db import connect

TINY = ("--batch-size", "4", "--block-size", "32", "--eval-batches", "1", "-q")
GGUF = Path(str(BUILTINS["smollm2-135m-instruct"].gguf_path()))


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A home with data set `words` (two source files), `words@1` trained on it from scratch
    and `words2@1` trained from `words@1` (`--init-from`): real commands, 2 + 1 steps."""
    home = tmp_path_factory.mktemp("chain")
    sources = [home / "raw" / "a.txt", home / "raw" / "b.txt"]
    sources[0].parent.mkdir()
    for i, path in enumerate(sources):
        path.write_text(syllable_text(150, i))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_HOME", str(home))
        prepare = ["data", "prepare", *map(str, sources), "--name", "words", "--tokenizer"]
        assert main([*prepare, "char", "--split", "tail", "--workers", "1", "-q"]) == 0
        train = ["train", "--data", "words", *TINY]
        assert main([*train, "--model", "tiny", "--name", "words", "--max-steps", "2"]) == 0
        assert main([*train, "--init-from", "words@1", "--name", "words2", "--max-steps", "1"]) == 0
    yield home


def record(home: Path, request_id: str, version: str, *, model: str = "words2") -> None:
    engine = connect(home=home)
    try:
        with engine.begin() as conn:
            ledger.record_usage(
                conn, request_id=request_id, key_id=None, endpoint="/v1/chat/completions",
                model=model, model_version=version, prompt_tokens=12, completion_tokens=30,
                ttft_ms=5.0, latency_ms=80.0, status="ok", http_status=200, cost_nusd=13_200,
                price_input=100_000, price_output=400_000,
            )  # fmt: skip
    finally:
        engine.dispose()


def nodes(root: LineageNode, kind: str) -> list[LineageNode]:
    return [n for n in root.walk() if n.kind == kind]


def test_request_traced_to_source_files(chain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rid = "req-" + "a1" * 16
    record(chain, rid, "words2@1")
    root = request_lineage(rid, home=chain)
    assert root.kind == "request" and root.label == rid
    assert root.details["model version"] == "words2@1" and root.details["key"] == "(no key)"
    assert root.details["cost"] == "$0.000013200"

    model, parent = nodes(root, "model")
    assert (model.label, parent.label) == ("words2@1", "words@1")
    assert parent.details["role"] == "parent"
    for m, name in ((model, "words2"), (parent, "words")):
        (path,) = (chain / "models" / name).iterdir()
        assert m.details["path"] == str(path)
        assert (
            m.details["weights sha256"]
            == hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
        )
    runs = nodes(root, "run")
    assert sorted(r.label for r in runs) == sorted(p.name for p in (chain / "runs").iterdir())
    assert [r.details["steps"] for r in runs] == ["1", "2"]
    assert all(r.missing is None and r.details["status"] == "completed" for r in runs)

    datasets = nodes(root, "dataset")
    manifest = chain / "datasets" / "words" / "manifest.json"
    assert [d.label for d in datasets] == ["words", "words"]
    assert (
        datasets[0].details["manifest sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    )
    assert datasets[0].details["content key"] == json.loads(manifest.read_text())["content_key"]
    sources = nodes(datasets[0], "source")
    assert [s.label for s in sources] == [str(chain / "raw" / f) for f in ("a.txt", "b.txt")]
    for s in sources:
        assert s.details["sha256"] == hashlib.sha256(Path(s.label).read_bytes()).hexdigest()
        assert s.details["documents"] == "1 kept of 1" and s.missing is None  # a .txt: one
    (tokenizer,) = nodes(datasets[0], "tokenizer")
    assert tokenizer.details["kind"] == "char"
    assert not [n for n in root.walk() if n.missing]

    # The CLI prints the same tree as JSON, and as a rich Tree.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_HOME", str(chain))
        capsys.readouterr()
        assert main(["lineage", rid, "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == root.to_dict()
        assert main(["lineage", "words2"]) == 0
    text = capsys.readouterr().out
    assert "model words2@1" in text and "model words@1" in text and "a.txt" in text


def test_model_lineage_ends_at_the_builtin_gguf(
    tiny_tokenizer, tmp_path: Path, lmforge_home: Path
) -> None:  # type: ignore[no-untyped-def]
    from lmforge.model.formats import save_model
    from lmforge.model.transformer import Transformer

    lineage = {"name": "child", "parent": "smollm2-135m-instruct"}
    path = save_model(
        Transformer(tiny_config("llama")), tiny_tokenizer, tmp_path / "m", lineage=lineage
    )
    root = model_lineage(str(path))
    assert root.label == str(path) and root.details["kind"] == "path"
    assert "note" not in root.details and root.missing is None
    (builtin,) = [n for n in nodes(root, "model") if n is not root]
    assert builtin.label == "smollm2-135m-instruct" and builtin.details["kind"] == "built-in"
    (gguf,) = nodes(builtin, "gguf")
    assert gguf.label == str(GGUF)
    assert gguf.details["size"] == f"{GGUF.stat().st_size:,} bytes"
    assert gguf.details["sha256"] == hashlib.sha256(GGUF.read_bytes()).hexdigest()

    # A request served by the built-in (model version: the GGUF's hash) leads to the same node.
    record(
        lmforge_home,
        "req-" + "b2" * 16,
        f"smollm2-135m-instruct@sha256:{gguf.details['sha256'][:12]}",
    )
    served = request_lineage("req-" + "b2" * 16)
    (served_by,) = served.children
    assert served_by.label == builtin.label and served_by.children == builtin.children
    # … and one served by a registered directory, by its weights' hash.
    engine = connect(home=lmforge_home)
    with engine.begin() as conn:
        rec = repo.register_model(conn, name="m", path=path, sha256=root.details["weights sha256"])
    engine.dispose()
    record(lmforge_home, "req-" + "c3" * 16, f"m@sha256:{rec.sha256[:12]}", model="m")
    assert request_lineage("req-" + "c3" * 16).children[0].label == "m@1"


def test_missing_artifacts_are_marked_not_fatal(
    tiny_tokenizer, tmp_path: Path, lmforge_home: Path
) -> None:  # type: ignore[no-untyped-def]
    from lmforge.model.formats import save_model
    from lmforge.model.transformer import Transformer

    data = tmp_path / "data"
    data.mkdir()
    gone_source = tmp_path / "gone.txt"
    manifest = {
        "name": "d", "content_key": "k1",
        "sources": [{"path": str(gone_source), "sha256": "0" * 64, "bytes": 9}],
        "funnel": [{"documents": 1}], "splits": {}, "tokenizer": {"kind": "char"},
    }  # fmt: skip
    (data / "manifest.json").write_text(json.dumps(manifest))
    lineage = {
        "run_id": "r-1", "run_dir": str(tmp_path / "no-run"), "steps": 3, "wall_seconds": 1.0,
        "dataset": {"name": "d", "path": str(data), "content_key": "k1"}, "parent": "nope@3",
    }  # fmt: skip
    model = Transformer(tiny_config("gpt2"))
    path = save_model(model, tiny_tokenizer, tmp_path / "m", lineage=lineage)
    engine = connect(home=lmforge_home)
    with engine.begin() as conn:
        rec = repo.register_model(conn, name="m", path=path, sha256="1" * 64, parent="nope@3")
        repo.register_model(conn, name="gone", path=tmp_path / "x", sha256="2" * 64)
    engine.dispose()

    root = model_lineage("m")
    assert root.label == rec.ref and root.missing is None
    missing = {n.kind: n.missing for n in root.walk() if n.missing}
    assert set(missing) == {"run", "source", "model"}, missing
    assert "is gone" in missing["run"] and missing["source"] == "no longer there"
    assert missing["model"].startswith("unknown model 'nope@3'")
    assert nodes(root, "run")[0].details["steps"] == "3"  # the recorded numbers are still shown
    assert "lmforge.json says" in root.details["warning"]  # registry and file disagree

    # Re-preparing the data set under the same name loses the training data: marked too.
    (data / "manifest.json").write_text(json.dumps({**manifest, "content_key": "k2"}))
    (dataset,) = nodes(model_lineage("m"), "dataset")
    assert dataset.missing is not None and "re-prepared" in dataset.missing and not dataset.children

    shutil.rmtree(data)
    (dataset,) = nodes(model_lineage("m"), "dataset")
    assert dataset.missing is not None and "manifest.json is gone" in dataset.missing

    assert model_lineage("gone").missing == f"registered at {tmp_path / 'x'}, now gone"
    record(lmforge_home, "req-" + "d4" * 16, "m@9", model="m")
    (child,) = request_lineage("req-" + "d4" * 16).children
    assert child.missing == "the registry has no model m@9"


def test_bad_refs_are_one_line_errors(
    lmforge_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(LmforgeError, match="unknown request id 'req-nope'"):
        request_lineage("req-nope")
    record(lmforge_home, "req-" + "e5" * 16, "x@1")
    for ref, needle in (("req-" + "f6" * 16, "unknown request id"), ("no-such", "unknown model")):
        capsys.readouterr()
        assert main(["lineage", ref]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert_one_line_error(lmforge("lineage", "req-nope", home=lmforge_home), "unknown request id")
    proc = lmforge("lineage", "--help", home=lmforge_home)
    assert proc.returncode == 0 and "Examples" in proc.stdout
