"""The second built-in, `gemma3-270m` (Gemma 3 270M, Q4_K_M GGUF), against `transformers`
loading the same GGUF file (`gguf_file=`): fp32 logits within 1e-3 with the same top 5, and 64
identical greedy tokens for three fixed prompts; its parameter count and lineage; and
`lmforge chat gemma3-270m` piped. Each model is loaded once (one test uses transformers'), so
that a parallel run does not load them twice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import greedy_disagreement, lmforge, one_gguf_parse
from lmforge.builtin import BUILTINS

GEMMA3 = BUILTINS["gemma3-270m"]
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "长城是中国古代的",
]

pytestmark = pytest.mark.skipif(
    GEMMA3.unavailable() is not None, reason=f"{GEMMA3.unavailable()} (make setup does)"
)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gemma3-home")


@pytest.fixture(scope="module")
def ours(home: Path) -> Any:
    import lmforge

    return lmforge.load("gemma3-270m", home=home)


def load_theirs(home: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    path = GEMMA3.gguf_path(home)
    assert path is not None
    with one_gguf_parse():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    return model.eval()


def prompt_ids(ours: Any, text: str) -> list[int]:
    ids = ours.tokenizer.encode(text)
    assert ids[0] == ours.tokenizer.bos_id  # Gemma's files add BOS
    return ids


def test_loads_with_its_n_params_and_lineage(ours: Any, home: Path) -> None:
    assert sum(p.numel() for p in ours.model.parameters()) == GEMMA3.n_params
    record = json.loads((home / "builtin" / "gemma3-270m" / "lmforge.json").read_text())
    assert record["source"]["sha256"] == GEMMA3.sha256


def test_logits_and_64_greedy_tokens_equal_transformers_on_the_same_gguf(
    ours: Any, home: Path
) -> None:
    theirs = load_theirs(home)
    for text in PROMPTS:
        ids = prompt_ids(ours, text)
        with torch.no_grad():
            want = theirs(torch.tensor([ids])).logits[0, -1]
            got = ours.model(torch.tensor([ids]))[0, -1]
        assert (got - want).abs().max() < 1e-3, text
        assert got.topk(5).indices.tolist() == want.topk(5).indices.tolist(), text
        greedy = ours.complete(text, max_tokens=64, temperature=0.0, ignore_eos=True)
        assert len(greedy.token_ids) == 64
        assert greedy_disagreement(theirs, ids, greedy.token_ids) is None, text


def test_chat_piped_uses_gemmas_own_template(ours: Any, home: Path) -> None:
    question = "What is the capital of France?"
    rendered = ours.tokenizer.render_chat([{"role": "user", "content": question}])
    assert "<start_of_turn>user" in rendered and rendered.endswith("<start_of_turn>model\n")
    proc = lmforge("chat", "gemma3-270m", "-n", "16", home=home, stdin=f"{question}\n")
    assert proc.returncode == 0, proc.stderr
    answer = ours.chat([{"role": "user", "content": question}], max_tokens=16)
    assert answer.strip() and proc.stdout == f"{answer}\n"
