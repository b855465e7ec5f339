"""The LSTM baseline: shapes, config checks, recurrent steps vs one pass, overfitting one batch,
the training loop, save/load, and generation against a full-recompute greedy loop."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import write_token_dataset
from lmforge.data.loader import TokenSplit
from lmforge.errors import CorruptArtifactError
from lmforge.infer.generate import generate_ids
from lmforge.infer.sampling import SamplingParams
from lmforge.model.formats import load_model, save_model
from lmforge.model.lstm import LSTMConfig, LSTMLanguageModel
from lmforge.model.presets import model_config
from lmforge.train.loop import LoopConfig, train
from lmforge.train.tasks import TokenWindows


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny LSTM kernels gain nothing from a second thread, and on a busy 2-core machine the
    hand-offs made this file >10× slower (measured: 65 s with 2 threads, 5 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_lstm(seed: int = 0, **overrides) -> LSTMLanguageModel:  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    fields = {"vocab_size": 384, "d_model": 32, "n_layer": 2, "max_seq_len": 16, **overrides}
    return LSTMLanguageModel(LSTMConfig(**fields)).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_forward_shapes_and_param_count(tie: bool) -> None:
    model = tiny_lstm(tie_embeddings=tie)
    ids = torch.randint(0, 384, (3, 11))
    logits = model(ids)
    assert logits.shape == (3, 11, 384)
    assert model(ids, last_only=True).shape == (3, 1, 384)
    logits2, (h, c) = model.forward_state(ids)
    assert h.shape == c.shape == (2, 3, 32)  # [L, B, C]
    torch.testing.assert_close(logits2, logits)
    assert (model.lm_head.weight is model.embed_tokens.weight) == tie
    unique = {id(p): p.numel() for p in model.parameters()}
    assert sum(unique.values()) == model.config.num_params()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vocab_size", 0),
        ("d_model", -1),
        ("n_layer", 0),
        ("max_seq_len", 2.5),
        ("dropout", 1.0),
        ("init_std", 0.0),
        ("tie_embeddings", "yes"),
        ("arch", "llama"),
    ],
)
def test_config_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"model\\.{field}"):
        LSTMConfig(**{field: value})  # type: ignore[arg-type]


def test_config_dict_round_trip_and_unknown_keys() -> None:
    config = LSTMConfig(vocab_size=100, d_model=48, dropout=0.1, tie_embeddings=False)
    assert LSTMConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="n_head"):
        LSTMConfig.from_dict({"arch": "lstm", "n_head": 4})


def test_lstm_preset() -> None:
    config = model_config("lstm", 65, {"dropout": 0.2})
    assert isinstance(config, LSTMConfig)
    assert (config.n_layer, config.d_model, config.max_seq_len) == (2, 256, 64)
    assert (config.vocab_size, config.dropout) == (65, 0.2)


def test_step_by_step_state_matches_one_pass() -> None:
    """The recurrent fast path (state carried between calls) against the plain full forward."""
    model = tiny_lstm()
    ids = torch.randint(0, 384, (2, 40))  # longer than max_seq_len: no context limit
    with torch.no_grad():
        full = model(ids)
        first, state = model.forward_state(ids[:, :7])  # a prompt, then one token at a time
        steps = [first]
        for t in range(7, ids.shape[1]):
            logits, state = model.forward_state(ids[:, t : t + 1], state)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_overfits_one_batch() -> None:
    model = tiny_lstm(vocab_size=64).train()
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (4, 17))
    x, y = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2, weight_decay=0.0)
    losses = []
    for _ in range(100):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(np.log(64), rel=0.05)  # a uniform guess at the start
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_trains_in_the_training_loop(tmp_path: Path) -> None:
    """The one loop (AdamW param groups, clipping, eval, checkpoints) trains the LSTM as is."""
    vocab = 32
    rng = np.random.default_rng(0)
    stream = np.zeros(6000, dtype=np.int64)
    for i in range(1, len(stream)):  # each token mostly determines the next
        stream[i] = (stream[i - 1] * 5 + 3) % vocab if rng.random() < 0.9 else rng.integers(vocab)
    write_token_dataset(tmp_path / "data", {"train": stream[:5000], "val": stream[5000:]}, vocab)
    splits = [TokenSplit.open(tmp_path / "data", s) for s in ("train", "val")]
    model = tiny_lstm(vocab_size=vocab, dropout=0.1)
    config = LoopConfig(
        max_steps=60,
        batch_size=8,
        block_size=16,
        warmup=2,
        lr=3e-2,
        min_lr=3e-3,
        eval_every=60,
        eval_batches=4,
    )
    result = train(model, TokenWindows(*splits), config, tmp_path / "run")
    assert result.step == 60
    # From ln(32) = 3.47 at the start; measured 2.05 at step 60 (the best possible is ~0.6).
    assert result.val_loss is not None and result.val_loss < 0.75 * np.log(vocab)


def test_save_load_round_trip(tiny_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_lstm(dropout=0.1)
    with torch.no_grad():  # non-zero biases, so their saving is exercised
        for name, p in model.lstm.named_parameters():
            if name.startswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    d = save_model(model, tiny_tokenizer, tmp_path / "lstm", lineage={"run": "r1"})
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LmforgeLSTMForCausalLM"]
    assert cfg["model_type"] == "lmforge-lstm"
    assert cfg["lmforge_config"] == model.config.to_dict()
    for name in ("tokenizer.json", "generation_config.json", "lmforge.json"):
        assert (d / name).is_file()
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "embed_tokens.weight" in names and "lm_head.weight" not in names  # tied: stored once
    assert "lstm.weight_hh_l1" in names

    loaded = load_model(d)
    assert isinstance(loaded.model, LSTMLanguageModel)
    assert loaded.config == model.config
    assert loaded.lineage["run"] == "r1"
    assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight
    assert not loaded.model.training
    ids = torch.randint(0, 384, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), model(ids))


def test_load_rejects_a_config_without_lmforge_config(tiny_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = save_model(tiny_lstm(), tiny_tokenizer, tmp_path / "lstm")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["lmforge_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptArtifactError, match="lmforge_config"):
        load_model(d)


def naive_greedy(model: LSTMLanguageModel, prompt: list[int], n: int) -> list[int]:
    """Argmax over the full forward of prompt + generated tokens, recomputed every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_generation_matches_full_recompute(tiny_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Larger weights than the init, so the greedy path wanders over many tokens.
    model = tiny_lstm(seed=3, init_std=1.0)
    loaded = load_model(save_model(model, tiny_tokenizer, tmp_path / "lstm"))
    prompt = tiny_tokenizer.encode("The quick brown fox")
    n = 2 * loaded.config.max_seq_len  # past the training context: an LSTM has no context end
    steps = list(generate_ids(loaded.model, prompt, SamplingParams(max_tokens=n)))
    want = naive_greedy(model, prompt, n)
    assert [s.token_id for s in steps] == want
    assert len(set(want)) > 3
    assert [s.finish_reason for s in steps] == [None] * (n - 1) + ["length"]


def test_generation_stops_at_a_stop_token(tiny_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_lstm(seed=3, init_std=1.0)
    prompt = tiny_tokenizer.encode("The quick brown fox")
    want = naive_greedy(model, prompt, 12)
    stop = want[5]
    params = SamplingParams(max_tokens=12, stop_token_ids=[stop])
    steps = list(generate_ids(model, prompt, params))
    cut = want.index(stop)
    assert [s.token_id for s in steps] == want[: cut + 1]
    assert steps[-1].finish_reason == "stop"
    assert list(generate_ids(model, prompt, SamplingParams(max_tokens=0))) == []


def test_api_has_no_context_end_for_an_lstm(tiny_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import lmforge

    model = tiny_lstm(seed=3, init_std=1.0)
    d = save_model(model, tiny_tokenizer, tmp_path / "lstm")
    llm = lmforge.load(str(d))
    assert isinstance(llm.model, LSTMLanguageModel)
    assert "arch=lstm" in repr(llm)
    ids = [5] * (2 * llm.config.max_seq_len)  # a prompt longer than the training context
    assert llm.logits(ids).shape == (len(ids), 384)
    done = llm.complete(ids, max_tokens=40, ignore_eos=True)
    assert done.completion_tokens == 40 and done.finish_reason == "length"
    assert done.token_ids == naive_greedy(model, ids, 40)
    bf16 = lmforge.load(str(d), dtype="bfloat16")
    assert bf16.model.lm_head.weight.dtype == torch.bfloat16
    assert bf16.complete(ids, max_tokens=8, ignore_eos=True).completion_tokens == 8
    stream = llm.stream("The quick", max_tokens=10, ignore_eos=True)
    next(stream)
    assert not torch.is_inference_mode_enabled()  # the recurrent state does not leak the mode
