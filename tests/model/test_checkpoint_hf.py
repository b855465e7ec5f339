"""Hugging Face layout: lmforge ↔ transformers on the same weights, both directions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lmforge.errors import CorruptArtifactError, LmforgeError, ModelNotFoundError
from lmforge.model.formats import load_model, save_model
from lmforge.model.transformer import Transformer

transformers = pytest.importorskip("transformers")


def hf_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(ids).logits


def test_saved_model_loads_in_transformers(tiny_model: Transformer, tiny_model_dir: Path) -> None:
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 24))
    with torch.no_grad():
        ours = tiny_model(ids)
    theirs = hf_logits(tiny_model_dir, ids)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    expected = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[tiny_model.config.arch]
    assert cfg["architectures"] == [expected]
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tiny_model_dir / name).is_file()
    lineage = json.loads((tiny_model_dir / "lmforge.json").read_text())
    assert len(lineage["weights_sha256"]) == 64


def test_saved_tokenizer_loads_in_transformers(tiny_model_dir: Path, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "The quick brown fox — café 🙂"
    assert tok(text)["input_ids"] == tiny_tokenizer.encode(text)
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == tiny_tokenizer.render_chat(messages)
    assert tok.eos_token == "<|im_end|>"


def test_round_trip_is_exact(tiny_model: Transformer, tiny_model_dir: Path) -> None:
    loaded = load_model(tiny_model_dir)
    for (name, a), (_, b) in zip(
        tiny_model.state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert loaded.config == tiny_model.config


def hf_tiny(arch: str, tmp_path: Path, tiny_tokenizer) -> Path:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=384,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rope_theta=5000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        )
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(
            vocab_size=384, n_embd=32, n_layer=2, n_head=4, n_positions=64
        )
        model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # make norms and biases non-trivial
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    out = tmp_path / f"hf-{arch}"
    model.save_pretrained(out)
    tiny_tokenizer.save(out)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_transformers_model_loads_in_lmforge(arch: str, tmp_path: Path, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    directory = hf_tiny(arch, tmp_path, tiny_tokenizer)
    ids = torch.randint(0, 384, (2, 20))
    theirs = hf_logits(directory, ids)
    loaded = load_model(directory)
    with torch.no_grad():
        ours = loaded.model(ids)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # and back out again: lmforge's save of it still matches transformers
    again = save_model(loaded.model, loaded.tokenizer, tmp_path / "again")
    torch.testing.assert_close(hf_logits(again, ids), theirs, atol=1e-5, rtol=1e-5)


def test_bad_directories(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        load_model(empty)
    weights = tiny_model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(CorruptArtifactError, match="safetensors") as exc:
        load_model(tiny_model_dir)
    assert "\n" not in str(exc.value)
    (tiny_model_dir / "config.json").write_text("{not json")
    with pytest.raises(CorruptArtifactError, match=r"config\.json"):
        load_model(tiny_model_dir)
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\0" * 10)
    with pytest.raises(LmforgeError, match=r"not \.gguf"):
        load_model(not_gguf)


def test_shape_mismatch_names_the_tensor(tiny_model_dir: Path) -> None:
    cfg_path = tiny_model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    key = "hidden_size" if "hidden_size" in cfg else "n_embd"
    cfg[key] = 64
    cfg.pop("head_dim", None)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CorruptArtifactError, match="shape"):
        load_model(tiny_model_dir)


def test_unsupported_rope_scaling_is_refused(tmp_path: Path, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    directory = hf_tiny("llama", tmp_path, tiny_tokenizer)
    cfg_path = directory / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rope_scaling"] = {"rope_type": "longrope", "factor": 4.0}
    cfg.pop("rope_parameters", None)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(LmforgeError, match=r"longrope.*not supported.*linear, llama3, yarn"):
        load_model(directory)


def test_no_pickle_anywhere() -> None:
    """No pickle in the package; every torch.load passes weights_only=True."""
    src = Path(__file__).resolve().parents[2] / "src" / "lmforge"
    for path in src.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_tokens_match_transformers(arch: str, tmp_path: Path, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """32 greedy tokens from lmforge's generation loop equal transformers' generate()."""
    import lmforge

    directory = hf_tiny(arch, tmp_path, tiny_tokenizer)
    prompt = [5, 17, 99, 3]
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        out = model.eval().generate(
            torch.tensor([prompt]),
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
            pad_token_id=0,
        )
    theirs = out[0, len(prompt) :].tolist()
    ours = lmforge.load(str(directory)).complete(prompt, max_tokens=32, ignore_eos=True)
    assert ours.token_ids == theirs


def test_sharded_safetensors_and_pytorch_bin(tmp_path: Path, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Hub-style directories: a sharded safetensors index, or a legacy pytorch_model.bin
    (read with weights_only=True)."""
    directory = hf_tiny("llama", tmp_path, tiny_tokenizer)
    ids = torch.randint(0, 384, (1, 16))
    reference = hf_logits(directory, ids)
    from safetensors.torch import load_file

    weights = load_file(str(directory / "model.safetensors"))

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((directory / name).read_bytes())
    from safetensors.torch import save_file

    names = sorted(weights)
    halves = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for shard, keys in halves.items():
        save_file({k: weights[k] for k in keys}, str(sharded / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, shard))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with torch.no_grad():
        torch.testing.assert_close(load_model(sharded).model(ids), reference, atol=1e-5, rtol=1e-5)

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (legacy / name).write_bytes((directory / name).read_bytes())
    torch.save(weights, legacy / "pytorch_model.bin")
    with torch.no_grad():
        torch.testing.assert_close(load_model(legacy).model(ids), reference, atol=1e-5, rtol=1e-5)

    # A shard path that escapes the directory is refused.
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "../legacy/pytorch_model.bin"}})
    )
    with pytest.raises(CorruptArtifactError, match="outside"):
        load_model(sharded)
