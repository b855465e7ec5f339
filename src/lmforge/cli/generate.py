"""`lmforge generate` and `lmforge chat`: talk to a model from the terminal."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from lmforge.builtin import DEFAULT_MODEL
from lmforge.cli.console import stderr_console
from lmforge.errors import LmforgeError

err = stderr_console()

MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", help="New tokens at most.")]
Temperature = Annotated[
    float, typer.Option("--temperature", "-t", help="0 = greedy (deterministic).")
]
TopK = Annotated[int, typer.Option("--top-k", help="Sample from the k most likely (0 = off).")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (1 = off).")]
MinP = Annotated[float, typer.Option("--min-p", help="Drop tokens below min-p × the top one.")]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed for reproducible sampling.")]
Stop = Annotated[
    list[str] | None, typer.Option("--stop", help="Stop before this string (repeatable).")
]
Dtype = Annotated[str, typer.Option("--dtype", help="float32 (exact) or bfloat16.")]
Threads = Annotated[int | None, typer.Option("--threads", help="CPU threads for torch.")]
Device = Annotated[
    str, typer.Option("--device", help="cpu, cuda, cuda:N or auto (a GPU if there is one).")
]


def load_llm(model: str | None, dtype: str, threads: int | None, device: str = "cpu") -> Any:
    """Load MODEL with a spinner on stderr (the first use of a built-in converts its GGUF)."""
    from lmforge.api import load
    from lmforge.builtin import BUILTINS

    name = model or DEFAULT_MODEL
    note = " (a built-in's first use converts its GGUF: ~10 s)" if name in BUILTINS else ""
    with err.status(f"loading {name} …{note}", spinner="dots"):
        return load(model, dtype=dtype, threads=threads, device=device)


def _options(
    max_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    seed: int | None,
    stop: list[str] | None,
) -> dict[str, Any]:
    return {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "min_p": min_p,
        "seed": seed,
        "stop": stop or [],
    }


def generate_command(
    args: Annotated[
        list[str],
        typer.Argument(
            help="[MODEL] PROMPT — MODEL is a registry name, a directory, a .gguf file or a "
            f"built-in name (default {DEFAULT_MODEL}); PROMPT '-' reads stdin.",
            show_default=False,
        ),
    ],
    max_tokens: MaxTokens = 128,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    seed: Seed = None,
    stop: Stop = None,
    stream: Annotated[
        bool, typer.Option("--stream/--no-stream", help="Print tokens as they come.")
    ] = True,
    chat: Annotated[
        bool, typer.Option("--chat", help="Send PROMPT as a user message (chat template).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    dtype: Dtype = "float32",
    threads: Threads = None,
    device: Device = "cpu",
) -> None:
    """Complete PROMPT with MODEL and print the continuation."""
    if len(args) > 2:
        raise LmforgeError("give at most two arguments: [MODEL] PROMPT (quote the prompt)")
    model, prompt = (None, args[0]) if len(args) == 1 else (args[0], args[1])
    if prompt == "-":
        prompt = sys.stdin.read()
    options = _options(max_tokens, temperature, top_k, top_p, min_p, seed, stop)
    llm_params_check(options)
    llm = load_llm(model, dtype, threads, device)
    params = llm.sampling_params(**options)
    if chat:
        ids = llm.chat_prompt_ids([{"role": "user", "content": prompt}])
    else:
        ids = llm.encode_prompt(prompt)
    completion = None
    for delta in llm.iter_complete(ids, params):
        if stream and not as_json and delta.text:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        completion = delta.completion or completion
    assert completion is not None
    if as_json:
        record = {
            "model": llm.name,
            "prompt": prompt,
            "text": completion.text,
            "finish_reason": completion.finish_reason,
            "token_ids": completion.token_ids,
            "usage": {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "total_tokens": completion.prompt_tokens + completion.completion_tokens,
            },
            "timings": {
                "ttft_s": round(completion.ttft_s, 4),
                "total_s": round(completion.total_s, 4),
                "decode_tokens_per_s": round(completion.decode_tokens_per_s, 2),
            },
        }
        print(json.dumps(record, ensure_ascii=False))
        return
    if not stream:
        sys.stdout.write(completion.text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    err.print(
        f"[dim]{completion.completion_tokens} tokens · "
        f"{completion.decode_tokens_per_s:.1f} tokens/s · finish: {completion.finish_reason}[/dim]"
    )


def llm_params_check(options: dict[str, Any]) -> None:
    """Validate sampling options before the (slow) model load, so bad flags fail fast."""
    from lmforge.infer.sampling import SamplingParams

    SamplingParams(**options)


def chat_command(
    model: Annotated[
        str | None,
        typer.Argument(
            help=f"Registry name, directory, .gguf or built-in (default {DEFAULT_MODEL})."
        ),
    ] = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")] = None,
    max_tokens: MaxTokens = 256,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    seed: Seed = None,
    stop: Stop = None,
    dtype: Dtype = "float32",
    threads: Threads = None,
    device: Device = "cpu",
) -> None:
    """Chat with MODEL, one message per line. /reset forgets the conversation, /exit quits.

    Works interactively and with piped input (each line of stdin is one user message).
    """
    options = _options(max_tokens, temperature, top_k, top_p, min_p, seed, stop)
    llm_params_check(options)
    llm = load_llm(model, dtype, threads, device)
    params = llm.sampling_params(**options)
    interactive = sys.stdin.isatty()
    base = [{"role": "system", "content": system}] if system else []
    history: list[dict[str, str]] = list(base)
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        err.print(f"[dim]chatting with {llm.name} — /reset to start over, /exit to quit[/dim]")
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and line == "":
            break  # end of piped input
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(base)
            err.print("[dim](conversation reset)[/dim]")
            continue
        history.append({"role": "user", "content": text})
        try:
            ids = llm.chat_prompt_ids(history)
        except LmforgeError as exc:
            history.pop()
            err.print(f"error: {exc} — use /reset to start over", markup=False)
            continue
        if interactive:
            sys.stdout.write("assistant> ")
        reply, finish = "", "stop"
        for delta in llm.iter_complete(ids, params):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            if delta.completion is not None:
                reply, finish = delta.completion.text, delta.completion.finish_reason
        sys.stdout.write("\n")
        sys.stdout.flush()
        if interactive and finish == "length":
            err.print("[dim](cut at --max-tokens)[/dim]")
        history.append({"role": "assistant", "content": reply})


GENERATE_EPILOG = (
    "[bold]Examples[/bold]\n\n"
    "  lmforge generate 'The capital of France is'\n\n"
    "  lmforge generate smollm2-135m-instruct 'Write a haiku' --chat -t 0.7 --seed 1\n\n"
    "  lmforge generate ./my-model 'Once upon a time' -n 64 --stop '\\n\\n' --json\n\n"
    "  echo 'Hello' | lmforge generate model.gguf -"
)
CHAT_EPILOG = (
    "[bold]Examples[/bold]\n\n"
    "  lmforge chat\n\n"
    "  lmforge chat my-model --system 'Answer in French.'\n\n"
    "  printf 'Hi!\\nWhat is 2+2?\\n' | lmforge chat"
)


def register(app: typer.Typer) -> None:
    app.command("generate", epilog=GENERATE_EPILOG)(generate_command)
    app.command("chat", epilog=CHAT_EPILOG)(chat_command)
