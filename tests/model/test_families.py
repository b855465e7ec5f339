"""Every model family against `transformers` on the same weights: tiny random models made by
transformers (no download) load in lmforge with the same logits and greedy tokens, lmforge's
saves load back in transformers, the KV-cache and engine paths equal full recomputation, and
LoRA and quantization round-trip. Each config switches on the family's distinctive features
(sliding windows shorter than the generation, QK-norm, biases, soft-capping, RoPE scaling,
partial rotary, NoPE layers, an independent head_dim)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from lmforge.errors import LmforgeError
from lmforge.infer.engine import Engine
from lmforge.infer.generate import generate_ids
from lmforge.infer.params import SamplingParams
from lmforge.infer.scheduler import SchedulerConfig
from lmforge.model.config import ModelConfig
from lmforge.model.formats import (
    load_adapter,
    load_head_model,
    load_model,
    save_adapter,
    save_model,
)
from lmforge.model.heads import HeadConfig, head_model
from lmforge.model.lora import LoraConfig, apply_lora, merge_lora
from lmforge.model.quant import QuantConfig, quantize_model
from lmforge.model.transformer import Transformer

VOCAB, CONTEXT, PROMPT, NEW = 384, 160, 16, 64
COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": CONTEXT,
    "tie_word_embeddings": False,
    "initializer_range": 0.1,  # peaked logits: greedy tokens do not hinge on float noise
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
# family → (config class, model class, config overrides)
FAMILIES: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "llama3": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        {"sliding_window": 24, "head_dim": 16},
    ),
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 40,
            }
        },
    ),
    "qwen3": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        {
            "head_dim": 24,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        },
    ),
    "gemma2": (
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "sliding_window": 24,
            "attn_logit_softcapping": 5.0,  # small caps: they change the result
            "final_logit_softcapping": 3.0,
            "tie_word_embeddings": True,
        },
    ),
    "gemma3": (
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        {
            "num_hidden_layers": 6,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 24,
            "tie_word_embeddings": True,
        },
    ),
    "phi3": (
        transformers.Phi3Config,
        transformers.Phi3ForCausalLM,
        {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
    ),
    "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM, {}),
    "smollm3": (
        transformers.SmolLM3Config,
        transformers.SmolLM3ForCausalLM,
        {"tie_word_embeddings": True},
    ),
}


def make_hf(name: str, directory: Path, tokenizer: Any) -> Path:
    config_cls, model_cls, overrides = FAMILIES[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**COMMON, **overrides}))
    with torch.no_grad():  # make norms and biases non-trivial
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    tokenizer.save(directory)
    return directory


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any
) -> Any:
    tmp = tmp_path_factory.mktemp(request.param)
    hf_dir = make_hf(request.param, tmp / "hf", tiny_tokenizer)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    return request.param, hf_dir, hf_model, tmp


def hf_greedy(model: Any, prompt: list[int]) -> list[int]:
    model.generation_config.eos_token_id = None  # plain greedy for NEW tokens, EOS or not
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def recompute_greedy(model: Transformer, prompt: list[int]) -> list[int]:
    """The slow obvious reference: the whole sequence through the model for every token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(NEW):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)


def engine_greedy(model: Transformer, prompts: list[list[int]]) -> list[list[int]]:
    engine = Engine(model, SchedulerConfig(max_batch=4, max_model_len=CONTEXT, block_size=16))
    requests = [engine.add_request(p, GREEDY) for p in prompts]
    while engine.has_work:
        engine.step()
    return [r.output_ids for r in requests]


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (PROMPT + 5 * i,), generator=g).tolist() for i in range(3)]


def test_logits_and_greedy_tokens_equal_transformers(family: Any) -> None:
    name, hf_dir, hf_model, _ = family
    loaded = load_model(hf_dir)
    ids = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf_model(ids).logits
        ours = loaded.model(ids)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    prompt = prompts()[0]
    want = hf_greedy(hf_model, prompt)
    got = [s.token_id for s in generate_ids(loaded.model, prompt, GREEDY)]
    assert got == want, name


def test_kv_cache_and_engine_equal_full_recompute(family: Any) -> None:
    _, hf_dir, _, _ = family
    model = load_model(hf_dir).model
    assert isinstance(model, Transformer)
    ps = prompts()
    cached = [[s.token_id for s in generate_ids(model, p, GREEDY)] for p in ps]
    assert cached[0] == recompute_greedy(model, ps[0])
    assert engine_greedy(model, ps) == cached  # batched, paged, prompts of different lengths


def test_lmforge_save_loads_in_transformers(family: Any) -> None:
    name, hf_dir, hf_model, tmp = family
    loaded = load_model(hf_dir)
    out = save_model(loaded.model, loaded.tokenizer, tmp / "ours")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == hf_model.config.model_type
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(again) is type(hf_model)
    ids = torch.randint(0, VOCAB, (1, 90), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf_model(ids).logits, atol=1e-5, rtol=1e-5)
    # and the save reads back into the same lmforge config
    assert load_model(out).config == loaded.config, name


def test_lora_and_quantize_round_trip(family: Any) -> None:
    _, hf_dir, _, tmp = family
    loaded = load_model(hf_dir)
    model = loaded.model
    assert isinstance(model, Transformer)
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    lora = LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down"))
    apply_lora(model, lora)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ".lora_B" in pname:
                p.normal_(0, 0.05)
        adapted = model(ids)
    adapter = save_adapter(model, loaded.tokenizer, tmp / "adapter", lora, hf_dir)
    reloaded, *_ = load_adapter(adapter)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), adapted)
        merged = merge_lora(model)
        torch.testing.assert_close(merged(ids), adapted, atol=1e-4, rtol=1e-4)

    base = load_model(hf_dir).model
    assert isinstance(base, Transformer)
    with torch.no_grad():
        float_logits = base(ids)
        quantize_model(base, QuantConfig(method="int8", head="int8"))
        quant_logits = base(ids)
    out = save_model(base, loaded.tokenizer, tmp / "int8")
    with torch.no_grad():
        torch.testing.assert_close(load_model(out).model(ids), quant_logits)
    # int8 stays near the float model
    error = (quant_logits - float_logits).norm() / float_logits.norm()
    assert error < 0.05


def test_features_without_a_hugging_face_spelling_are_refused_on_save(
    tmp_path: Path, tiny_tokenizer: Any
) -> None:
    config = ModelConfig(arch="qwen3", vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4)
    assert config.qk_norm == "head" and config.qkv_bias is False
    odd = ModelConfig(
        arch="llama", vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, qk_norm="head"
    )
    with pytest.raises(LmforgeError, match="qk_norm='head' cannot be saved as llama"):
        save_model(Transformer(odd), tiny_tokenizer, tmp_path / "odd")
    assert not (tmp_path / "odd" / "config.json").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "mixtral", "num_local_experts": 8}, "mixture-of-experts"),
        ({"model_type": "gemma3", "vision_config": {}}, "vision or audio tower"),
        ({"model_type": "mamba"}, "model_type 'mamba' is not supported"),
        ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}}, "'dynamic'"),
        ({"hidden_act": "relu2"}, "activation 'relu2'"),
    ],
)
def test_unsupported_architectures_are_one_line_naming_them(
    tmp_path: Path, tiny_tokenizer: Any, change: dict[str, Any], message: str
) -> None:
    directory = make_hf("llama3", tmp_path / "m", tiny_tokenizer)
    config = json.loads((directory / "config.json").read_text())
    config.update(change)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmforgeError, match=message) as info:
        load_model(directory)
    assert "\n" not in str(info.value)
    if "not supported" in message or "mixture" in message:
        assert "qwen3" in str(info.value)  # the supported list


def test_num_params_counts_every_feature() -> None:
    for arch in ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "olmo2", "smollm3", "gpt2"):
        config = ModelConfig(
            arch=arch, vocab_size=100, d_model=32, n_layer=6, n_head=4, sliding_window=8
        )
        model = Transformer(config)
        unique = {id(p): p.numel() for p in model.parameters()}
        assert config.num_params() == sum(unique.values()), arch


def test_sliding_window_blocks_outside_the_window_are_freed(
    tmp_path: Path, tiny_tokenizer: Any
) -> None:
    """Every Mistral layer sees the last 24 positions: a 140-token sequence holds at most
    ⌈24/16⌉ + 1 blocks at any step, and the tokens equal full recomputation."""
    model = load_model(make_hf("mistral", tmp_path / "m", tiny_tokenizer)).model
    assert isinstance(model, Transformer)
    engine = Engine(model, SchedulerConfig(max_batch=2, max_model_len=CONTEXT, block_size=16))
    prompt = prompts()[0] * 5  # 80 tokens: the prompt alone is longer than the window
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    request = engine.add_request(prompt, params)
    held = []
    while engine.has_work:
        engine.step()
        held.append(sum(b != 0 for b in request.block_ids))
    assert max(held[1:-1]) <= 3, held
    assert engine.scheduler.blocks.num_used == 0
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(NEW):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert request.output_ids == seq[len(prompt) :]


@pytest.mark.parametrize("task", ["classify", "qa"])
def test_task_heads_round_trip_and_load_in_transformers(family: Any, task: str) -> None:
    """A classification or QA head on each family's body: saved in the HF layout, it loads back
    in lmforge unchanged and, where transformers has the class, in transformers too."""
    name, hf_dir, _, tmp = family
    loaded = load_model(hf_dir)
    assert isinstance(loaded.model, Transformer)
    torch.manual_seed(0)
    head = HeadConfig(task, ("neg", "pos") if task == "classify" else ())
    model = head_model(loaded.model, head).eval()
    ids = torch.randint(3, 200, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(ids)
    out = save_model(model, loaded.tokenizer, tmp / f"head-{task}")
    again, _, _ = load_head_model(out)
    with torch.no_grad():
        torch.testing.assert_close(again(ids), want)
    auto = {
        "classify": transformers.AutoModelForSequenceClassification,
        "qa": transformers.AutoModelForQuestionAnswering,
    }[task]
    try:
        theirs = auto.from_pretrained(out).eval()
    except ValueError:  # transformers has no such head class for this family
        assert task == "qa", name
        return
    with torch.no_grad():
        got = theirs(ids)
    if task == "classify":
        torch.testing.assert_close(got.logits, want, atol=1e-4, rtol=1e-4)
    else:
        torch.testing.assert_close(got.start_logits, want[..., 0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.end_logits, want[..., 1], atol=1e-4, rtol=1e-4)
