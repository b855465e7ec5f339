"""The built-in SmolLM2-135M-Instruct against a reference no one here wrote: `transformers`
loading the same GGUF file (`gguf_file=`), fp32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import greedy_disagreement, one_gguf_parse
from lmforge.builtin import BUILTINS, DEFAULT_MODEL

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village, there lived",
]


@pytest.fixture(scope="module")
def hf_reference():  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    gguf = BUILTINS[DEFAULT_MODEL].gguf_path()
    assert gguf is not None
    with one_gguf_parse():
        tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    return tok, model.eval()


def test_same_tokens_as_transformers_tokenizer(builtin_llm, hf_reference) -> None:  # type: ignore[no-untyped-def]
    tok, _ = hf_reference
    texts = [*PROMPTS, "Numbers 12345 and émoji 🙂 — 東京!", "  leading spaces\n\ttabs"]
    for text in texts:
        assert builtin_llm.tokenizer.encode(text) == tok(text)["input_ids"], text
    messages = [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    ours = builtin_llm.tokenizer.render_chat(messages)
    theirs = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == theirs


def test_logits_match_transformers(builtin_llm, hf_reference) -> None:  # type: ignore[no-untyped-def]
    _, model = hf_reference
    for prompt in PROMPTS:
        ids = builtin_llm.tokenizer.encode(prompt)
        ours = builtin_llm.logits(ids)  # [T, V]
        with torch.inference_mode():
            theirs = model(torch.tensor([ids])).logits[0].float()
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() < 1e-3, prompt
        top_ours = ours[-1].topk(5).indices.tolist()
        top_theirs = theirs[-1].topk(5).indices.tolist()
        assert top_ours == top_theirs, prompt


def test_greedy_64_tokens_match_transformers(builtin_llm, hf_reference) -> None:  # type: ignore[no-untyped-def]
    tok, model = hf_reference
    for prompt in PROMPTS[:2]:
        ids = tok(prompt)["input_ids"]
        ours = builtin_llm.complete(prompt, max_tokens=64, temperature=0.0, ignore_eos=True)
        assert len(ours.token_ids) == 64
        assert greedy_disagreement(model, ids, ours.token_ids) is None, prompt


def test_capital_of_france(builtin_llm) -> None:  # type: ignore[no-untyped-def]
    done = builtin_llm.complete("The capital of France is", max_tokens=64)
    assert done.text == " Paris.\n\nThe answer is: 2018-01-22 12:12:53."
    assert done.finish_reason == "stop"
    assert done.token_ids[-1] == builtin_llm.tokenizer.eos_id


def test_builtin_facts(builtin_llm, builtin_home: Path) -> None:  # type: ignore[no-untyped-def]
    spec = BUILTINS[DEFAULT_MODEL]
    assert builtin_llm.config.num_params() == spec.n_params
    assert sum(p.numel() for p in builtin_llm.model.parameters()) == spec.n_params
    # The cache is an ordinary HF directory with lineage back to the GGUF.
    cache = builtin_home / "builtin" / DEFAULT_MODEL
    lineage = json.loads((cache / "lmforge.json").read_text())
    assert lineage["source"]["kind"] == "gguf"
    assert len(lineage["source"]["sha256"]) == 64
    cfg = json.loads((cache / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_key_value_heads"] == 3
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 100000.0}


def test_cached_dir_loads_in_transformers(builtin_llm, builtin_home: Path) -> None:  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    cache = builtin_home / "builtin" / DEFAULT_MODEL
    model = transformers.AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32).eval()
    ids = builtin_llm.tokenizer.encode(PROMPTS[0])
    with torch.inference_mode():
        theirs = model(torch.tensor([ids])).logits[0]
    assert (builtin_llm.logits(ids) - theirs).abs().max().item() < 1e-3
