"""The Python API: `lmforge.load(MODEL)` → `LLM`, for notebooks and scripts.

    import lmforge
    llm = lmforge.load("smollm2-135m-instruct")
    llm.generate("The capital of France is", max_tokens=16)        # → " Paris. …"
    llm.chat([{"role": "user", "content": "Hi!"}])                  # chat template applied
    for piece in llm.stream("Once upon a time", max_tokens=32):     # text as it is generated
        print(piece, end="")
    llm.logits(llm.tokenizer.encode("Hello"))                       # [T, V] next-token logits

Keyword options everywhere: max_tokens, temperature (0 = greedy, the default), top_k, top_p,
min_p, seed, stop (strings), ignore_eos, presence/frequency/repetition_penalty, logit_bias
({token id: -100..100}; -100 bans, +100 forces) and logits_processors (callables
`(prompt_ids, output_ids, logits) -> logits | allowed mask`, see `lmforge.infer.logits`).
The CLI's `generate` and `chat` are thin shells over this class.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.infer.generate import check_prompt, context_length, generate_ids
from lmforge.infer.logits import LogitsProcessor
from lmforge.infer.sampling import SamplingParams
from lmforge.model.devices import model_device, resolve_device
from lmforge.model.formats import LoadedModel, load_model
from lmforge.model.lstm import LSTMConfig, LSTMLanguageModel
from lmforge.model.transformer import ModelConfig, Transformer, optimize_weight_layout
from lmforge.resolve import ModelRef, resolve
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.stream import TextStream

Messages = Sequence[dict[str, Any]]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float  # time to the first token
    total_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.completion_tokens - 1
        return n / (self.total_s - self.ttft_s) if n > 0 and self.total_s > self.ttft_s else 0.0


@dataclass
class Delta:
    """A piece of a streamed completion; the last one carries the finished `Completion`."""

    text: str
    completion: Completion | None = None


class LLM:
    """A loaded model with its tokenizer; generation, chat, streaming and raw logits."""

    def __init__(self, loaded: LoadedModel, ref: ModelRef | None = None) -> None:
        self.loaded = loaded
        self.ref = ref
        self.name = ref.name if ref else str(loaded.path)
        self.stop_token_ids = loaded.stop_token_ids()

    @property
    def model(self) -> Transformer | LSTMLanguageModel:
        return self.loaded.model

    @property
    def tokenizer(self) -> Tokenizer:
        return self.loaded.tokenizer

    @property
    def config(self) -> ModelConfig | LSTMConfig:
        return self.loaded.model.config

    @property
    def path(self) -> Path:
        return self.loaded.path

    def __repr__(self) -> str:
        c = self.config
        return f"LLM({self.name!r}, arch={c.arch}, n_layer={c.n_layer}, d_model={c.d_model})"

    # -- options -------------------------------------------------------------------------------

    def sampling_params(
        self,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        logit_bias: Mapping[int, float] | None = None,
    ) -> SamplingParams:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            seed=seed,
            stop=stops,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=ignore_eos,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            repetition_penalty=repetition_penalty,
            logit_bias=None if logit_bias is None else dict(logit_bias),
        )

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        check_prompt(ids, context_length(self.model), self.config.vocab_size)
        return ids

    # -- generation ----------------------------------------------------------------------------

    def iter_complete(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        processors: Sequence[LogitsProcessor] = (),
    ) -> Iterator[Delta]:
        """Stream text deltas for PROMPT_IDS; the final Delta holds the whole Completion."""
        stream = TextStream(self.tokenizer, params.stop)
        ids: list[int] = []
        start = time.perf_counter()
        ttft = 0.0
        finish = "length"
        for step in generate_ids(self.model, prompt_ids, params, processors=processors):
            if not ids:
                ttft = time.perf_counter() - start
            if step.finish_reason == "stop":
                finish = "stop"
                ids.append(step.token_id)
                break
            ids.append(step.token_id)
            piece = stream.push(step.token_id)
            if piece:
                yield Delta(piece)
            if stream.stopped:
                finish = "stop"
                break
        tail = stream.finish()
        completion = Completion(
            text=stream.text,
            token_ids=ids,
            finish_reason=finish,
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(ids),
            ttft_s=ttft,
            total_s=time.perf_counter() - start,
        )
        yield Delta(tail, completion)

    def complete(self, prompt: str | Sequence[int], **options: Any) -> Completion:
        """Generate for PROMPT (text or ids) and return text, ids, finish reason and timings."""
        processors = options.pop("logits_processors", ())
        params = self.sampling_params(**options)
        final = None
        for delta in self.iter_complete(self.encode_prompt(prompt), params, processors):
            final = delta.completion or final
        assert final is not None
        return final

    def generate(self, prompt: str | Sequence[int], **options: Any) -> str:
        """The completion text for PROMPT."""
        return self.complete(prompt, **options).text

    def stream(self, prompt: str | Sequence[int], **options: Any) -> Iterator[str]:
        """The completion text for PROMPT, piece by piece as it is generated."""
        processors = options.pop("logits_processors", ())
        params = self.sampling_params(**options)
        for delta in self.iter_complete(self.encode_prompt(prompt), params, processors):
            if delta.text:
                yield delta.text

    # -- chat ----------------------------------------------------------------------------------

    def chat_prompt_ids(self, messages: Messages) -> list[int]:
        ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        check_prompt(ids, context_length(self.model), self.config.vocab_size)
        return ids

    def chat(self, messages: Messages, **options: Any) -> str:
        """The assistant's reply to MESSAGES (OpenAI shape: [{"role", "content"}, …])."""
        return "".join(self.chat_stream(messages, **options))

    def chat_stream(self, messages: Messages, **options: Any) -> Iterator[str]:
        processors = options.pop("logits_processors", ())
        params = self.sampling_params(**options)
        for delta in self.iter_complete(self.chat_prompt_ids(messages), params, processors):
            if delta.text:
                yield delta.text

    # -- raw -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def logits(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Next-token logits for every position: ids [T] → [T, V], or [B, T] → [B, T, V]."""
        x = torch.as_tensor(ids, dtype=torch.long, device=model_device(self.model))
        single = x.dim() == 1
        if single:
            x = x.unsqueeze(0)
        if x.dim() != 2 or x.shape[1] == 0:
            raise LmforgeError("ids must be a non-empty sequence [T] or a batch [B, T]")
        context = context_length(self.model)
        if context is not None and x.shape[1] > context:
            raise LmforgeError(f"{x.shape[1]} tokens exceed the model's context of {context}")
        if int(x.min()) < 0 or int(x.max()) >= self.config.vocab_size:
            raise LmforgeError(f"token ids must be in 0..{self.config.vocab_size - 1}")
        out = self.model(x).float()
        return out[0] if single else out


def load(
    model: str | None = None,
    *,
    dtype: str = "float32",
    threads: int | None = None,
    home: Path | None = None,
    device: str = "cpu",
) -> LLM:
    """Load MODEL: a registry name (`name` or `name@3`), an HF directory, a .gguf file, or a
    built-in name; None means the built-in `smollm2-135m-instruct`.

    `dtype`: float32 (default, exact) or bfloat16. `threads`: torch intra-op threads.
    `device`: cpu (default), cuda, cuda:N or auto (a GPU if there is one).
    """
    if dtype not in _DTYPES:
        raise LmforgeError(f"dtype must be one of {', '.join(sorted(_DTYPES))}, got {dtype!r}")
    if threads is not None:
        if threads < 1:
            raise LmforgeError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    target = resolve_device(device)
    ref = resolve(model, home=home)
    loaded = load_model(ref.path, dtype=_DTYPES[dtype])
    if target.type == "cpu":
        optimize_weight_layout(loaded.model)  # CPU layouts (split small-batch matmuls)
    else:
        loaded.model.to(target)
    return LLM(loaded, ref)
