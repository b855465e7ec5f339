"""`lmforge demo`: the main job end to end. For now: the built-in model completes a prompt
greedily and holds a two-turn chat. Later stages (data → train → serve) join as they land."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

from lmforge.builtin import DEFAULT_MODEL

out = Console(highlight=False)


def demo_command(
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Tokens per answer.")] = 64,
) -> None:
    """Run the demo: a greedy completion and a two-turn chat with the built-in model."""
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
    out.print("[dim]next: lmforge generate 'your prompt' · lmforge chat · lmforge --help[/dim]")


def register(app: typer.Typer) -> None:
    app.command(
        "demo",
        epilog="[bold]Examples[/bold]\n\n  lmforge demo\n\n  make demo",
    )(demo_command)
