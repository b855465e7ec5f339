"""`lmforge export` as a user runs it (in-process): GGUF and HF outputs, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch

from conftest import assert_one_line_error, lmforge_here, tiny_config

transformers = pytest.importorskip("transformers")


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def llama_dir(request: pytest.FixtureRequest, tiny_tokenizer, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    from lmforge.model.formats import save_model
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config("llama", tie_embeddings=request.param, init_std=0.2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return save_model(model.eval(), tiny_tokenizer, tmp_path / "tiny", lineage={"name": "tiny"})


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def test_gguf_then_hf_end_to_end(capsys, llama_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """directory → F32 GGUF (exact) → HF directory that transformers loads (same logits)."""
    from lmforge.model.formats import load_model

    original = load_model(llama_dir)
    path = tmp_path / "out" / "tiny.f32.gguf"
    proc = lmforge_here(capsys, "export", str(llama_dir), "--out", str(path), "--type", "f32")
    assert proc.returncode == 0, proc.stderr
    for needle in ("file", "size", "type", "seconds", " MB ", " f32 "):
        assert needle in proc.stdout, proc.stdout
    assert "tiny.f32.gguf" in proc.stdout.replace("│", "").replace("\n", "").replace(" ", "")
    from_gguf = load_model(path)
    for name, want in original.model.state_dict().items():
        assert torch.equal(from_gguf.model.state_dict()[name], want), name

    hf_dir = tmp_path / "hf"
    proc = lmforge_here(capsys, "export", str(path), "--format", "hf", "--out", str(hf_dir))
    assert proc.returncode == 0, proc.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (hf_dir / name).is_file(), name
    assert (hf_dir / "generation_config.json").is_file()
    lineage = json.loads((hf_dir / "lmforge.json").read_text())
    assert lineage["exported_from"] == str(path)
    ids = torch.randint(0, original.config.vocab_size, (2, 24), generator=torch.Generator())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        hf_logits = theirs.eval()(ids).logits
    torch.testing.assert_close(hf_logits, logits(original.model, ids), atol=1e-5, rtol=1e-5)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "The quick brown fox — café 🙂"
    assert hf_tok(text)["input_ids"] == original.tokenizer.encode(text)


def test_default_type_registry_name_and_force(capsys, llama_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    proc = lmforge_here(capsys, "models", "import", str(llama_dir), "--name", "tiny")
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "tiny.gguf"
    assert lmforge_here(capsys, "export", "tiny", "--out", str(path)).returncode == 0
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    assert reader.fields["general.name"].contents() == "tiny"  # the lineage's name
    proc = lmforge_here(capsys, "export", "tiny", "--out", str(path), "--type", "q8_0")
    assert_one_line_error(proc, "exists", "--force")
    proc = lmforge_here(
        capsys, "export", "tiny", "--out", str(path), "-f", "gguf", "--type", "q8_0", "--force"
    )
    assert proc.returncode == 0, proc.stderr
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()  # an empty directory is fine
    assert lmforge_here(capsys, "export", "tiny", "-f", "hf", "-o", str(hf_dir)).returncode == 0
    proc = lmforge_here(capsys, "export", "tiny", "--format", "hf", "--out", str(hf_dir))
    assert_one_line_error(proc, "not empty", "--force")
    (hf_dir / "stale.txt").write_text("x")
    proc = lmforge_here(capsys, "export", "tiny", "--format", "hf", "--out", str(hf_dir), "--force")
    assert proc.returncode == 0, proc.stderr
    assert not (hf_dir / "stale.txt").exists() and (hf_dir / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "lmforge-home", "tiny", "tiny.gguf"]


def test_help_has_examples(capsys) -> None:  # type: ignore[no-untyped-def]
    proc = lmforge_here(capsys, "export", "--help")
    assert proc.returncode == 0
    for needle in ("--format", "--type", "--out", "--force", "Examples", "q8_0"):
        assert needle in proc.stdout, needle


# -- bad input: one line, non-zero exit, nothing written -----------------------------------------


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--format", "onnx", "--out", "x.gguf"], ["--format", "onnx"]),
        (["--type", "q4_k", "--out", "x.gguf"], ["--type", "q4_k"]),
        (["--format", "hf", "--type", "q8_0", "--out", "d"], ["--format hf", "q8_0"]),
        (["--out", "x.bin"], ["must end in .gguf"]),
        ([], ["--out"]),
    ],
)
def test_bad_flags(capsys, llama_dir: Path, flags, needles, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.iterdir())
    proc = lmforge_here(capsys, "export", str(llama_dir), *flags)
    assert_one_line_error(proc, *needles)
    assert sorted(tmp_path.iterdir()) == before


def test_bad_outputs(capsys, llama_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    some_dir = tmp_path / "stuff"
    some_dir.mkdir()
    (some_dir / "notes.txt").write_text("keep me")
    proc = lmforge_here(
        capsys, "export", str(llama_dir), "-f", "hf", "-o", str(some_dir), "--force"
    )
    assert_one_line_error(proc, "not a model directory")
    assert (some_dir / "notes.txt").read_text() == "keep me"
    proc = lmforge_here(capsys, "export", str(llama_dir), "-o", str(tmp_path / "d.gguf"))
    assert proc.returncode == 0
    proc = lmforge_here(
        capsys, "export", str(llama_dir), "-f", "hf", "-o", str(tmp_path / "d.gguf")
    )
    assert_one_line_error(proc, "is a file")
    (tmp_path / "x.gguf").mkdir()
    assert_one_line_error(
        lmforge_here(capsys, "export", str(llama_dir), "-o", str(tmp_path / "x.gguf")),
        "is a directory",
    )
    proc = lmforge_here(
        capsys, "export", str(llama_dir), "-f", "hf", "-o", str(llama_dir), "--force"
    )
    assert_one_line_error(proc, "is the model being exported")


def test_models_that_cannot_be_exported(capsys, tiny_tokenizer, llama_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lmforge.model.formats import load_model, save_adapter, save_model
    from lmforge.model.heads import HeadConfig, head_model
    from lmforge.model.lora import LoraConfig, apply_lora
    from lmforge.model.transformer import Transformer

    out = str(tmp_path / "o.gguf")
    assert_one_line_error(
        lmforge_here(capsys, "export", "no-such-model", "-o", out), "unknown model"
    )

    gpt2 = save_model(Transformer(tiny_config("gpt2")), tiny_tokenizer, tmp_path / "gpt2")
    assert_one_line_error(
        lmforge_here(capsys, "export", str(gpt2), "-o", out), "gpt2", "--format hf"
    )

    body = load_model(llama_dir).model
    assert isinstance(body, Transformer)
    classifier = head_model(body, HeadConfig("classify", ("neg", "pos")))
    head_dir = save_model(classifier, tiny_tokenizer, tmp_path / "cls")
    assert_one_line_error(lmforge_here(capsys, "export", str(head_dir), "-o", out), "task head")
    hf_out = tmp_path / "cls-hf"
    proc = lmforge_here(capsys, "export", str(head_dir), "-f", "hf", "-o", str(hf_out))
    assert proc.returncode == 0, proc.stderr  # a head model as HF: fine
    config = json.loads((hf_out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]

    base = load_model(llama_dir).model
    assert isinstance(base, Transformer)
    lora = LoraConfig(rank=2, targets=("q", "v"))
    apply_lora(base, lora)
    adapter = save_adapter(base, tiny_tokenizer, tmp_path / "adapter", lora, llama_dir)
    for fmt, name in (("gguf", "a.gguf"), ("hf", "a")):
        proc = lmforge_here(capsys, "export", str(adapter), "-f", fmt, "-o", str(tmp_path / name))
        assert_one_line_error(proc, "LoRA adapter", "lmforge models merge")
    assert not any((tmp_path / name).exists() for name in ("o.gguf", "a.gguf", "a"))
