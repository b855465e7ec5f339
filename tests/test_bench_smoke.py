"""Every benchmark in bench/ runs its real code path at tiny sizes (`--smoke`), so none can rot.

Each bench runs as a user runs it (`python bench/NAME.py --smoke`, a subprocess) and must exit 0
and print its result lines. Nothing outside the repository is needed: the anchors that are
(nanoGPT, llama.cpp, transformers, lm-eval) are skipped in smoke mode, and the benches whose full
run measures a built-in model run a tiny random model of the same kind instead (seconds, not
the 135M model's half minute). A bench that needs the built-in itself gets the session's
converted copy through $LMFORGE_HOME.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import zygote
from conftest import run_env

BENCH = Path(__file__).resolve().parent.parent / "bench"

# bench → (needs the built-in model, lines its report must print)
SMOKES = {
    "data": (False, ["prepare (clean + PII", "MinHash stage"]),
    "train": (False, ["lmforge ", "larger: lmforge", "targets (the issue)"]),
    "generate": (False, ["a tiny random Llama", "prefill tok/s", "lmforge "]),
    "quantize": (
        False,
        ["a tiny random Llama", "perplexity", "int8 ", "int8 perplexity within 1% of fp32"],
    ),
    "finetune": (False, ["SST-2 (dev)"]),
    "lm_eval_server": (False, ["a tiny random Llama", "max |Δ loglikelihood|", "OK"]),
    "serve": (False, ["Part C:", "lmforge fp32", "cached TTFT"]),
    "gguf_llama_cpp": (False, ["gemma3", "F32 read back by lmforge"]),
    "families": (False, ["lmforge tiny gemma3: perplexity"]),
}


def test_every_bench_has_a_smoke_run() -> None:
    assert {p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_")} == set(SMOKES)


@pytest.mark.parametrize("name", sorted(SMOKES))
def test_bench_smoke(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    needs_builtin, lines = SMOKES[name]
    home = request.getfixturevalue("builtin_home") if needs_builtin else tmp_path / "home"
    env = run_env(home)
    if zygote.enabled():  # each `lmforge` the bench runs forked, as lmforge(…) does
        command, extra = zygote.client_command()
        env |= {**extra, "LMFORGE_BENCH_COMMAND": shlex.join(command)}
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), "--smoke"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for line in lines:
        assert line in proc.stdout, f"{line!r} not printed:\n{proc.stdout[-3000:]}"
