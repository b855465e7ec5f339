"""Dev check: llama.cpp runs lmforge's GGUF exports of every family and computes what lmforge does.

    .venv/bin/python bench/gguf_llama_cpp.py --llama-cpp PATH/TO/llama.cpp   # built, with build/bin

Not a test (it needs a built llama.cpp and a C++ compiler). For each family with a GGUF layout
(llama, mistral, qwen2, qwen3, gemma2, gemma3, olmo2, smollm3, phi3) a tiny random model with the
family's distinctive features (Llama 3 RoPE scaling and biases; Mistral without a window,
written as llama; YaRN; QK-norm, head_dim ≠ d_model/n_head and linear scaling; soft-capping and
sliding windows shorter than the sequence; Gemma 3's 5:1 pattern and local θ; OLMo 2's
post-norms and whole-width QK-norm; SmolLM3's NoPE layer; Phi-3's partial rotary)
is exported as F32 and Q8_0, and as F32 again after lmforge
reads llama.cpp's own `llama-quantize` Q4_K_M of it. A 40-line C++ program against libllama
(compiled here with g++) decodes a 20-token prompt and 40 greedy tokens on the CPU with an F32
KV cache and returns the logits of every position; lmforge runs the same 60 tokens
(teacher-forced). Printed per file: whether llama.cpp's greedy tokens equal lmforge's, the share
of positions whose top-1 tokens agree, and the largest logit difference.

Expected (measured with llama.cpp 0c1e570, the llama-cpp-python 0.3.36 vendored tree): F32
within ~4e-5 (Gemma within ~2e-3: llama.cpp's GELU reads an fp16 table); Q8_0 within a few
tenths on these random models (|logit| ≤ ~7) with top-1 flips on near-ties, because llama.cpp's
Q8_0 matmuls quantize the activations too; "Q4_K_M read by lmforge" as close as F32 (lmforge
dequantizes the K-quant blocks bit for bit as ggml does). "phi3 (window 16)" agrees only on the
first 16 positions: llama.cpp ignores Phi-3's sliding window ("Phi SWA is currently disabled").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

VOCAB, PROMPT, NEW = 384, 20, 40
WINDOW = 16  # the sliding windows: shorter than the 60 tokens
COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "d_model": 256,  # rows of 256: whole K-quant blocks
    "n_layer": 2,
    "n_head": 4,
    "n_kv_head": 2,
    "d_ff": 512,
    "max_seq_len": 128,
    "init_std": 0.1,
}
CASES: dict[str, dict[str, Any]] = {
    "llama": {
        "arch": "llama",
        "tie_embeddings": False,
        "qkv_bias": True,
        "o_bias": True,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 8.0,
            "original_max_position_embeddings": 8192,
        },
    },
    "mistral": {"arch": "mistral", "tie_embeddings": False, "rope_theta": 1e6},  # as llama
    "qwen2": {
        "arch": "qwen2",
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 40},
    },
    "qwen3": {"arch": "qwen3", "head_dim": 96, "rope_scaling": {"type": "linear", "factor": 2.0}},
    "gemma2": {
        "arch": "gemma2",
        "n_layer": 3,
        "head_dim": 64,
        "sliding_window": WINDOW,
        "attn_softcap": 5.0,
        "final_softcap": 3.0,
    },
    "gemma3": {"arch": "gemma3", "n_layer": 6, "head_dim": 64, "sliding_window": WINDOW},
    "olmo2": {"arch": "olmo2", "tie_embeddings": False},  # GQA: attn_k_norm of n_kv·head_dim
    "smollm3": {"arch": "smollm3", "n_layer": 4},  # layer 4 without RoPE
    "phi3": {"arch": "phi3", "rotary_fraction": 0.5, "tie_embeddings": False},
    "phi3 (window 16)": {"arch": "phi3", "sliding_window": WINDOW},
}

DUMP_CPP = r"""
#include "llama.h"
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>
static void quiet(ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}
// logits MODEL OUT N_NEW ids...: OUT = int32 V, int32 rows, float32 [rows, V], int32 [N_NEW]
int main(int argc, char ** argv) {
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) return 1;
    int n_new = atoi(argv[3]);
    std::vector<llama_token> ids;
    for (int i = 4; i < argc; i++) ids.push_back(atoi(argv[i]));
    auto cp = llama_context_default_params();
    cp.n_ctx = cp.n_batch = cp.n_ubatch = ids.size() + n_new + 8;
    cp.type_k = cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.swa_full = true;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) return 1;
    const int V = llama_vocab_n_tokens(llama_model_get_vocab(model));
    llama_batch batch = llama_batch_init(ids.size(), 0, 1);
    for (size_t i = 0; i < ids.size(); i++) {
        batch.token[i] = ids[i]; batch.pos[i] = i; batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0; batch.logits[i] = 1;
    }
    batch.n_tokens = ids.size();
    if (llama_decode(ctx, batch)) return 1;
    std::vector<float> rows;
    for (size_t i = 0; i < ids.size(); i++) {
        float * l = llama_get_logits_ith(ctx, i); rows.insert(rows.end(), l, l + V);
    }
    std::vector<int> greedy;
    for (int g = 0; g < n_new; g++) {
        llama_token next = std::max_element(rows.end() - V, rows.end()) - (rows.end() - V);
        greedy.push_back(next);
        if (llama_decode(ctx, llama_batch_get_one(&next, 1))) return 1;
        float * l = llama_get_logits_ith(ctx, -1); rows.insert(rows.end(), l, l + V);
    }
    FILE * f = fopen(argv[2], "wb");
    int n_rows = rows.size() / V;
    fwrite(&V, 4, 1, f); fwrite(&n_rows, 4, 1, f);
    fwrite(rows.data(), 4, rows.size(), f); fwrite(greedy.data(), 4, greedy.size(), f);
    fclose(f);
    return 0;
}
"""


def compile_dumper(llama_cpp: Path, work: Path) -> Path:
    src, exe, lib = work / "logits.cpp", work / "logits", llama_cpp / "build" / "bin"
    src.write_text(DUMP_CPP)
    subprocess.run(
        ["g++", "-O1", "-std=c++17", str(src), f"-I{llama_cpp / 'include'}",
         f"-I{llama_cpp / 'ggml' / 'include'}", f"-L{lib}", "-lllama", "-lggml", "-lggml-base",
         f"-Wl,-rpath,{lib}", "-o", str(exe)],
        check=True,
    )  # fmt: skip
    return exe


def llama_cpp_logits(exe: Path, path: Path, prompt: list[int]) -> tuple[np.ndarray, list[int]]:
    out = path.with_suffix(".logits")
    run = subprocess.run([exe, path, out, str(NEW), *map(str, prompt)], capture_output=True)
    if run.returncode:
        raise RuntimeError(run.stderr.decode(errors="replace").strip().splitlines()[-1])
    raw = out.read_bytes()
    v, rows = np.frombuffer(raw[:8], np.int32)
    logits = np.frombuffer(raw[8 : 8 + 4 * v * rows], np.float32).reshape(rows, v)
    return logits, np.frombuffer(raw[8 + 4 * v * rows :], np.int32).tolist()


def tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lmforge.tokenizer import Tokenizer

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(
        ["The quick brown fox jumps over the lazy dog. 0123 "] * 50, trainer
    )
    return Tokenizer(backend=backend, bos_token="<|im_start|>", eos_token="<|im_end|>")


def compare(exe: Path, path: Path, model: torch.nn.Module, prompt: list[int]) -> str:
    try:
        theirs, tokens = llama_cpp_logits(exe, path, prompt)
    except RuntimeError as exc:
        return f"llama.cpp cannot run it: {exc}"
    seq, ours_greedy = list(prompt), []
    with torch.no_grad():
        for _ in range(NEW):
            ours_greedy.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
            seq.append(ours_greedy[-1])
        ours = model(torch.tensor([prompt + tokens]))[0].numpy()  # on llama.cpp's tokens
    same = next(
        (i for i, (a, b) in enumerate(zip(tokens, ours_greedy, strict=True)) if a != b), NEW
    )
    top1 = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
    diff = np.abs(theirs - ours).max(-1)
    scale = float(np.abs(ours).max())
    return (
        f"greedy {same:2d}/{NEW} equal, top-1 agree {top1:6.1%}, max |Δlogit| {diff.max():.1e} "
        f"(first {WINDOW} positions {diff[:WINDOW].max():.1e}; |logit| ≤ {scale:.1f})"
    )


def tiny_model(fields: dict[str, Any]) -> torch.nn.Module:
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**COMMON, **fields})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def smoke() -> None:
    """Every case exported as F32 and read back by lmforge: the plumbing, without llama.cpp."""
    from lmforge.model.formats import LoadedModel, load_model
    from lmforge.model.formats.gguf_write import export_gguf

    tokenizer = tiny_tokenizer()
    prompt = torch.tensor([np.random.default_rng(0).integers(3, VOCAB, PROMPT).tolist()])
    with tempfile.TemporaryDirectory() as tmp:
        for case, fields in CASES.items():
            model = tiny_model(fields)
            loaded = LoadedModel(model, tokenizer, Path(tmp) / "m", lineage={"name": "tiny"})
            path = export_gguf(loaded, Path(tmp) / f"{case.split()[0]}.gguf", "f32")
            with torch.no_grad():
                diff = (load_model(path).model(prompt) - model(prompt)).abs().max()
            print(f"{case:17s} F32 read back by lmforge: max |Δlogit| {float(diff):.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-cpp", type=Path, help="a built llama.cpp tree")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seconds, for make test: no llama.cpp; each family's F32 export read back by lmforge",
    )
    args = parser.parse_args()
    if args.smoke:
        smoke()
        return
    if args.llama_cpp is None:
        parser.error("--llama-cpp PATH is required (or --smoke)")
    from lmforge.model.formats import LoadedModel, load_model
    from lmforge.model.formats.gguf_write import export_gguf

    tokenizer = tiny_tokenizer()
    quantize = args.llama_cpp / "build" / "bin" / "llama-quantize"
    env = {**os.environ, "LD_LIBRARY_PATH": str(args.llama_cpp / "build" / "bin")}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        exe = compile_dumper(args.llama_cpp, work)
        prompt = np.random.default_rng(0).integers(3, VOCAB, PROMPT).tolist()
        for case, fields in CASES.items():
            model = tiny_model(fields)
            # general.name "tiny": llama.cpp sets Phi-3 token attributes on names with "phi3"
            loaded = LoadedModel(model, tokenizer, work / "m", lineage={"name": "tiny"})
            stem = case.split()[0] + str(len(fields))
            for dtype in ("f32", "q8_0"):
                path = export_gguf(loaded, work / f"{stem}-{dtype}.gguf", dtype)
                print(f"{case:17s} {dtype.upper():26s} {compare(exe, path, model, prompt)}")
            if quantize.exists():
                k_quant = work / f"{stem}-q4_k_m.gguf"
                subprocess.run(
                    [quantize, work / f"{stem}-f32.gguf", k_quant, "Q4_K_M"],
                    env=env, capture_output=True, check=True,
                )  # fmt: skip
                read = load_model(k_quant)
                again = export_gguf(read, work / f"{stem}-k-f32.gguf", "f32", name="tiny")
                line = compare(exe, again, read.model.eval(), prompt)
                print(f"{case:17s} {'Q4_K_M read by lmforge':26s} {line}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
