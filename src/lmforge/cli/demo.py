"""`lmforge demo`: the main job end to end, as far as it has landed.

1. The built-in model completes a prompt greedily and holds a two-turn chat.
2. Data → train → generate: 120 kB of Shakespeare shipped with lmforge becomes a character-level
   data set (`lmforge data prepare`), a nanoGPT-sized model is pretrained on it (`lmforge train`,
   a few hundred steps) and registered, and writes a few lines of its own.

Each step runs the real command, so what the demo shows is what the commands do."""

from __future__ import annotations

from importlib import resources
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

from lmforge.builtin import DEFAULT_MODEL
from lmforge.errors import LmforgeError

out = Console(highlight=False)


def demo_command(
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Tokens per answer.")] = 64,
    train_steps: Annotated[
        int, typer.Option(help="Training steps of the pretraining part (0: skip it).")
    ] = 600,
) -> None:
    """Run the demo: the built-in model completes and chats; then data → train → generate."""
    from lmforge.cli.generate import load_llm

    llm = load_llm(DEFAULT_MODEL, "float32", None)
    out.rule(f"[bold]lmforge demo[/bold] · {llm.name}")
    prompt = "The capital of France is"
    done = llm.complete(prompt, max_tokens=max_tokens)
    out.print(Panel(f"[bold]{prompt}[/bold]{escape(done.text)}", title="greedy completion"))
    out.print(
        f"[dim]{done.completion_tokens} tokens, {done.decode_tokens_per_s:.1f} tokens/s decode, "
        f"first token after {done.ttft_s * 1000:.0f} ms[/dim]"
    )
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    turns = []
    for question in (None, "And what is it famous for? Answer in one sentence."):
        if question:
            messages.append({"role": "user", "content": question})
        reply = llm.chat(messages, max_tokens=max_tokens)
        messages.append({"role": "assistant", "content": reply})
        turns.append((messages[-2]["content"], reply))
    body = "\n\n".join(
        f"[bold]user:[/bold] {escape(q)}\n[bold]assistant:[/bold] {escape(a)}" for q, a in turns
    )
    out.print(Panel(body, title="two-turn chat (chat template applied)"))
    if train_steps > 0:
        _pretrain(train_steps)
    out.print("[dim]next: lmforge generate 'your prompt' · lmforge chat · lmforge --help[/dim]")


def _run(argv: list[str]) -> None:
    from lmforge.cli.main import main  # imported here: main imports this module

    out.print(f"[bold]$ lmforge {' '.join(argv)}[/bold]")
    if main(argv) != 0:
        raise LmforgeError(f"the demo step 'lmforge {argv[0]} {argv[1]}' failed")


def _pretrain(steps: int) -> None:
    """Shakespeare → character data set → nanoGPT-sized model → a sample of its writing."""
    import lmforge

    name = "demo-shakespeare"
    out.rule("[bold]data → train → generate[/bold]")
    with resources.as_file(resources.files("lmforge.demo_data") / "shakespeare.txt") as text:
        _run(
            ["data", "prepare", str(text), "--name", name, "--tokenizer", "char",
             "--split", "tail", "--val-fraction", "0.1", "-q"]
        )  # fmt: skip
    _run(
        ["train", "--data", name, "--model", "nanogpt-shakespeare-cpu", "--name", name,
         "--max-steps", str(steps), "--eval-every", str(max(1, steps // 4)),
         "--ckpt-every", str(max(1, steps // 2)), "--lr", "2e-3", "--min-lr", "2e-4",
         "--warmup", str(min(100, steps // 10))]
    )  # fmt: skip
    llm = lmforge.load(name)
    prompt = "ROMEO:\n"
    sample = llm.generate(prompt, max_tokens=240, temperature=0.8, seed=1)
    out.print(Panel(f"[bold]{escape(prompt)}[/bold]{escape(sample)}", title=f"{name} writes"))


def register(app: typer.Typer) -> None:
    app.command(
        "demo",
        epilog="[bold]Examples[/bold]\n\n  lmforge demo\n\n  make demo",
    )(demo_command)
