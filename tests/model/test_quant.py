"""Weight-only int8/int4 quantization: error bounds, the kernels against a float reference,
whole tiny models (generate, engine, save → load), and one-line refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from lmforge.errors import LmforgeError
from lmforge.infer.engine import Engine
from lmforge.infer.generate import generate_ids
from lmforge.infer.params import SamplingParams
from lmforge.infer.scheduler import SchedulerConfig
from lmforge.model.formats import load_model, save_model
from lmforge.model.quant import (
    KERNEL_MAX_ROWS,
    Int4Linear,
    Int8Linear,
    QuantConfig,
    QuantLinear,
    dequantize_int4,
    dequantize_int8,
    is_quantized,
    pack_uint4,
    quantization_of,
    quantize_int4,
    quantize_int8,
    quantize_model,
    unpack_uint4,
)
from lmforge.model.transformer import Linear, Transformer

CONFIGS = [
    QuantConfig("int8"),
    QuantConfig("int4", 32),
    QuantConfig("int4", 32, "int4"),
    QuantConfig("int8", None, "float"),
]
CONFIG_IDS = ["int8", "int4-int8-head", "int4-int4-head", "int8-float-head"]


def _weight(n: int, k: int) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.02
    w[0] = 0.0  # an all-zero row (int8) and constant groups (int4)
    w[1, :32] = 0.5
    w[2, 5] = 0.3  # an outlier
    return w


def test_int8_error_is_at_most_half_a_step_per_row() -> None:
    w = _weight(48, 64)
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == (48, 64) and scales.shape == (48,)
    err = (dequantize_int8(q, scales) - w).abs()  # [N, K]
    assert torch.all(err <= scales[:, None] / 2 + 1e-7)
    assert torch.equal(dequantize_int8(q, scales)[0], torch.zeros(64))


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_error_is_at_most_half_a_step_per_group(group_size: int) -> None:
    w = _weight(32, 128)
    q, scales, zeros = quantize_int4(w, group_size)
    groups = 128 // group_size
    assert q.dtype == torch.uint8 and q.shape == (32, 64)
    assert scales.shape == zeros.shape == (32, groups)
    assert int(unpack_uint4(q).max()) <= 15
    err = (dequantize_int4(q, scales, zeros) - w).abs().view(32, groups, group_size)
    assert torch.all(err <= scales[..., None] / 2 + 1e-6)
    assert torch.equal(dequantize_int4(q, scales, zeros)[1, :32], w[1, :32])  # constant group


def test_uint4_packing_is_the_documented_layout() -> None:
    q = torch.randint(0, 16, (16, 32), dtype=torch.uint8)
    packed = pack_uint4(q)
    assert packed.shape == (16, 16)
    assert int(packed[3, 2]) == int(q[3, 4]) | int(q[3, 5]) << 4  # even column: low nibble
    assert torch.equal(unpack_uint4(packed), q)


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, KERNEL_MAX_ROWS + 5])  # the kernel, and the GEMM path
def test_module_matches_the_dequantized_reference(method: str, rows: int) -> None:
    torch.manual_seed(0)
    linear = Linear(128, 96, bias=True)
    module = (
        Int8Linear.from_float(linear) if method == "int8" else Int4Linear.from_float(linear, 32)
    )
    x = torch.randn(2, rows, 128)  # any leading dims
    with torch.inference_mode():
        y = module(x)
        reference = x @ module.dequantize().T + linear.bias
        exact = linear(x)
    assert y.shape == (2, rows, 96) and y.dtype == torch.float32
    if rows <= KERNEL_MAX_ROWS:
        # The kernels run in bf16 (8 significant bits in, fp32 sums): within bf16 rounding.
        off = float((y - reference).norm() / reference.norm())
        assert off < 5e-3, off
    else:
        torch.testing.assert_close(y, reference, rtol=1e-4, atol=1e-5)
    relative = float((y - exact).norm() / exact.norm())
    assert relative < (0.01 if method == "int8" else 0.1), relative


def _model(arch: str, **overrides) -> Transformer:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return Transformer(tiny_config(arch, **overrides)).eval()


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_quantized_logits_stay_close_to_float(arch: str, config: QuantConfig) -> None:
    model = _model(arch, tie_embeddings=True)
    quantized = copy.deepcopy(model)
    layers = quantize_model(quantized, config)
    assert len(layers) == 2 * 4 + (config.head != "float")
    head = quantized.lm_head
    assert head.method == config.head if isinstance(head, QuantLinear) else config.head == "float"
    assert is_quantized(quantized) and not is_quantized(model)
    assert quantization_of(quantized) == config
    assert isinstance(quantized.model.embed_tokens.weight, torch.nn.Parameter)  # still float
    ids = torch.randint(0, 384, (2, 20))
    with torch.inference_mode():
        want, got = model(ids), quantized(ids)
    relative = float((got - want).norm() / want.norm())
    assert relative < (0.02 if config.method == "int8" else 0.15), relative


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize(("arch", "tie"), [("llama", False), ("llama", True), ("gpt2", True)])
def test_save_load_round_trip_gives_identical_logits(
    arch: str, tie: bool, config: QuantConfig, tiny_tokenizer, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    model = _model(arch, tie_embeddings=tie)
    quantize_model(model, config)
    d = save_model(model, tiny_tokenizer, tmp_path / "q")
    hf = json.loads((d / "config.json").read_text())
    assert hf["quantization_config"]["quant_method"] == "lmforge"
    assert hf["quantization_config"]["method"] == config.method
    assert hf["quantization_config"]["group_size"] == config.group_size
    loaded = load_model(d)
    assert quantization_of(loaded.model) == config
    ids = torch.randint(0, 384, (2, 20))
    with torch.inference_mode():
        assert torch.equal(model(ids), loaded.model(ids))
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    layer = "model.layers.0.self_attn.q_proj" if arch == "llama" else "transformer.h.0.attn.c_attn"
    assert {f"{layer}.qweight", f"{layer}.scales"} <= names
    assert ("lm_head.qweight" in names) == (config.head != "float")


def test_quantized_model_generates_through_generate_and_engine(
    tiny_tokenizer, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    model = _model("llama")
    quantize_model(model, QuantConfig("int4", 32))
    loaded = load_model(save_model(model, tiny_tokenizer, tmp_path / "q")).model
    assert isinstance(loaded, Transformer)
    prompts = [[5, 6, 7], list(range(10, 40)), [100]]
    params = [SamplingParams(max_tokens=n) for n in (12, 5, 20)]
    single = [
        [s.token_id for s in generate_ids(loaded, p, sp)]
        for p, sp in zip(prompts, params, strict=True)
    ]
    assert [len(s) for s in single] == [12, 5, 20]
    engine = Engine(loaded, SchedulerConfig(max_batch=4, max_model_len=64))
    requests = engine.generate(prompts, params)
    assert [r.output_ids for r in requests] == single


def test_bfloat16_load_runs_the_quantized_layers(tiny_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = _model("llama")
    quantize_model(model, QuantConfig("int8"))
    d = save_model(model, tiny_tokenizer, tmp_path / "q")
    half = load_model(d, dtype=torch.bfloat16).model
    ids = torch.randint(0, 384, (1, 8))
    with torch.inference_mode():
        want, got = model(ids), half(ids).float()
    assert float((got - want).norm() / want.norm()) < 0.05


def test_refusals_are_one_line() -> None:
    model = _model("llama")
    with pytest.raises(LmforgeError, match="unknown quantization method 'int3'"):
        QuantConfig("int3")
    with pytest.raises(LmforgeError, match="int8 quantization is per output channel"):
        QuantConfig("int8", 64)
    with pytest.raises(LmforgeError, match="group size must be one of"):
        QuantConfig("int4", 48)
    with pytest.raises(LmforgeError, match="unknown head method 'int2'"):
        QuantConfig("int4", head="int2")
    with pytest.raises(LmforgeError, match="an int4 head needs --method int4"):
        QuantConfig("int8", head="int4")
    with pytest.raises(
        LmforgeError,
        match=r"group size 64 does not divide model.layers.0.self_attn.qkv_proj's in_features "
        r"\(32\)",
    ):
        quantize_model(model, QuantConfig("int4", 64))
    assert not is_quantized(model)  # checked before anything was swapped
    quantize_model(model, QuantConfig("int8"))
    with pytest.raises(LmforgeError, match="already quantized"):
        quantize_model(model, QuantConfig("int4"))


def test_lora_and_lstm_models_are_refused() -> None:
    from lmforge.model.lora import LoraConfig, apply_lora
    from lmforge.model.lstm import LSTMConfig, LSTMLanguageModel

    model = _model("llama")
    apply_lora(model, LoraConfig())
    with pytest.raises(LmforgeError, match="LoRA adapters"):
        quantize_model(model, QuantConfig("int8"))
    lstm = LSTMLanguageModel(LSTMConfig(vocab_size=64, d_model=32, n_layer=1))
    with pytest.raises(LmforgeError, match="only Transformer"):
        quantize_model(lstm, QuantConfig("int8"))  # type: ignore[arg-type]


def test_foreign_quantization_config_is_refused(tiny_model_dir: Path) -> None:
    path = tiny_model_dir / "config.json"
    hf = json.loads(path.read_text())
    hf["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    path.write_text(json.dumps(hf))
    with pytest.raises(LmforgeError, match="'gptq' quantization is not supported"):
        load_model(tiny_model_dir)
