"""The Python API (`lmforge.load` → `LLM`) on tiny models: the pieces agree with each other."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.errors import LmforgeError


def test_import_lmforge_does_not_import_torch() -> None:
    code = "import sys, lmforge; assert 'torch' not in sys.modules; print(lmforge.__version__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_generate_stream_complete_agree(tiny_model_dir: Path) -> None:
    llm = lmforge.load(str(tiny_model_dir))
    text = llm.generate("The quick", max_tokens=20)
    assert "".join(llm.stream("The quick", max_tokens=20)) == text
    done = llm.complete("The quick", max_tokens=20)
    assert done.text == text
    assert done.prompt_tokens == len(llm.tokenizer.encode("The quick"))
    assert done.completion_tokens == len(done.token_ids) <= 20
    assert llm.tokenizer.decode(done.token_ids) == text


def test_generate_matches_greedy_logits(tiny_model_dir: Path) -> None:
    """The generation loop (KV cache, split linears) against argmax of full-sequence logits."""
    llm = lmforge.load(str(tiny_model_dir))
    ids = llm.tokenizer.encode("Pack my box")
    done = llm.complete(ids, max_tokens=12, ignore_eos=True)
    seq = list(ids)
    for _ in range(12):
        seq.append(int(llm.logits(seq)[-1].argmax()))
    assert done.token_ids == seq[len(ids) :]


def test_stop_strings_cut_the_text(tiny_model_dir: Path) -> None:
    llm = lmforge.load(str(tiny_model_dir))
    full = llm.generate("The", max_tokens=30, ignore_eos=True)
    if len(full) < 4:
        pytest.skip("tiny model produced too little text")
    stop = full[2:4]
    cut = llm.complete("The", max_tokens=30, ignore_eos=True, stop=[stop])
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reason == "stop"


def test_chat_uses_template(tiny_model_dir: Path) -> None:
    llm = lmforge.load(str(tiny_model_dir))
    messages = [{"role": "user", "content": "hi"}]
    ids = llm.chat_prompt_ids(messages)
    assert llm.tokenizer.decode(ids, skip_special_tokens=False).startswith("<|im_start|>user\nhi")
    reply = llm.chat(messages, max_tokens=8)
    assert reply == llm.complete(ids, max_tokens=8).text


def test_logits_shapes_and_errors(tiny_model_dir: Path) -> None:
    llm = lmforge.load(str(tiny_model_dir))
    assert llm.logits([1, 2, 3]).shape == (3, llm.config.vocab_size)
    batch = llm.logits(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert batch.shape == (2, 3, llm.config.vocab_size)
    torch.testing.assert_close(batch[1], llm.logits([4, 5, 6]), atol=1e-5, rtol=1e-5)
    with pytest.raises(LmforgeError, match="token ids"):
        llm.logits([llm.config.vocab_size])
    with pytest.raises(LmforgeError, match="context"):
        llm.logits([1] * (llm.config.max_seq_len + 1))


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 2.0}, "top_p"),
    ],
)
def test_bad_options(tiny_model_dir: Path, options: dict, field: str) -> None:
    llm = lmforge.load(str(tiny_model_dir))
    with pytest.raises(LmforgeError, match=field):
        llm.generate("The", **options)


def test_max_tokens_zero_and_context_end(tiny_model_dir: Path) -> None:
    llm = lmforge.load(str(tiny_model_dir))
    assert llm.complete("The", max_tokens=0).completion_tokens == 0
    ids = [5] * (llm.config.max_seq_len - 3)
    done = llm.complete(ids, max_tokens=50, ignore_eos=True)
    assert done.completion_tokens == 3 and done.finish_reason == "length"


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="dtype"):
        lmforge.load(str(tmp_path), dtype="float8")
    with pytest.raises(LmforgeError, match="unknown model"):
        lmforge.load("no-such-model")


def test_bfloat16_load_generates_close_to_float32(tiny_model_dir: Path) -> None:
    fp32 = lmforge.load(str(tiny_model_dir))
    bf16 = lmforge.load(str(tiny_model_dir), dtype="bfloat16")
    assert bf16.model.lm_head.weight.dtype == torch.bfloat16
    ids = fp32.tokenizer.encode("The quick brown fox")
    a, b = fp32.logits(ids), bf16.logits(ids)
    assert (a - b).abs().max().item() < 0.05 * a.abs().max().item()
    done = bf16.complete(ids, max_tokens=8, ignore_eos=True)
    assert done.completion_tokens == 8


def test_streaming_does_not_leak_inference_mode(tiny_model_dir: Path) -> None:
    """Between streamed pieces, and after a stream is abandoned, autograd works as usual."""
    llm = lmforge.load(str(tiny_model_dir))
    stream = llm.stream("The quick", max_tokens=10, ignore_eos=True)
    next(stream)
    assert not torch.is_inference_mode_enabled()
    assert torch.is_grad_enabled()
    del stream
    x = torch.ones(2, requires_grad=True)
    (x * 3).sum().backward()
    assert x.grad is not None


def test_logit_bias_and_logits_processors(tiny_model_dir: Path) -> None:
    llm = lmforge.load(str(tiny_model_dir))
    forced = llm.complete("The quick", max_tokens=6, ignore_eos=True, logit_bias={65: 100})
    assert forced.token_ids == [65] * 6
    free = llm.complete("The quick", max_tokens=6, ignore_eos=True)
    banned = llm.complete(
        "The quick", max_tokens=6, ignore_eos=True, logit_bias=dict.fromkeys(free.token_ids, -100)
    )
    assert not set(banned.token_ids) & set(free.token_ids)
    seen: list[int] = []

    def only_even(prompt_ids, output_ids, logits):  # type: ignore[no-untyped-def]
        seen.append(len(output_ids))
        allowed = torch.zeros_like(logits, dtype=torch.bool)
        allowed[::2] = True
        return allowed

    chat = list(llm.chat_stream([{"role": "user", "content": "hi"}], max_tokens=5,
                                ignore_eos=True, logits_processors=[only_even]))  # fmt: skip
    assert chat and seen == [0, 1, 2, 3, 4]
    done = llm.complete("The", max_tokens=5, ignore_eos=True, logits_processors=[only_even])
    assert all(t % 2 == 0 for t in done.token_ids)
    with pytest.raises(LmforgeError, match="outside the vocabulary"):
        llm.generate("The", logit_bias={10**6: 1.0})
    with pytest.raises(LmforgeError, match="logit_bias"):
        llm.generate("The", logit_bias={1: 101})
