"""`lmforge demo`: the whole chain end to end, on a fresh machine, in a few minutes.

1. The built-in model completes a prompt greedily and holds a two-turn chat.
2. The demo pipeline (`demo_data/pipeline.yaml`, shipped with lmforge) runs through
   `lmforge pipeline run`'s code: 120 kB of Shakespeare becomes a character-level data set, a
   nanoGPT-sized model is trained on it and quantized to int8; the int8 model is evaluated on
   text it never saw, promoted to the alias `shakespeare` only if its perplexity passes, the
   alias is priced, and the pipeline's report is written.
3. `lmforge serve shakespeare` starts in its own process, a key is created, and the official
   `openai` client streams a completion from it; the demo prints the answer, the usage, the
   bill and the lineage of that very request, back to the source file.

Every step runs the real command or the library call behind it, so what the demo shows is what
the commands do."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from lmforge.builtin import DEFAULT_MODEL
from lmforge.cli.console import stdout_console
from lmforge.errors import LmforgeError
from lmforge.home import lmforge_home

out = stdout_console()

PROMPT = "ROMEO:\n"


def demo_command(
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", "-n", help="Tokens per built-in answer.")
    ] = 64,
    train_steps: Annotated[
        int, typer.Option(help="Training steps of the demo pipeline (0: skip the chain).")
    ] = 2000,
    serve_tokens: Annotated[
        int,
        typer.Option(help="Characters the served model streams back (its context is 64)."),
    ] = 56,
) -> None:
    """Run the demo: the built-in model chats; then the whole chain from text to a billed,
    traced API call."""
    _builtin(max_tokens)
    if train_steps > 0:
        _chain(train_steps, serve_tokens)
    out.print("[dim]next: lmforge generate 'your prompt' · lmforge chat · lmforge --help[/dim]")


def _builtin(max_tokens: int) -> None:
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


def demo_pipeline_file() -> Path:
    """The shipped demo pipeline (its data files lie beside it)."""
    folder = resources.files("lmforge.demo_data")
    path = Path(str(folder)) / "pipeline.yaml"
    if not path.is_file():  # pragma: no cover - lmforge installed as a zip
        raise LmforgeError(f"the demo pipeline is not a file on disk ({folder})")
    return path


def _chain(steps: int, tokens: int) -> None:
    from lmforge.cli.main import main  # imported here: main imports this module
    from lmforge.pipeline.report import write_report
    from lmforge.pipeline.run import PipelineState, run_pipeline
    from lmforge.pipeline.spec import load_pipeline

    home = lmforge_home()
    pipeline = load_pipeline(demo_pipeline_file())
    train = pipeline.stage("train").options
    train.update(max_steps=steps, eval_every=max(1, steps // 4), ckpt_every=max(1, steps // 2),
                 warmup=min(100, steps // 10))  # fmt: skip
    out.rule("[bold]pipeline: data → train → quantize → eval → register → price[/bold]")
    out.print(f"[dim]{escape(str(demo_pipeline_file()))}[/dim]")

    def execute(argv: list[str]) -> int:
        out.print(f"[bold]$ lmforge {escape(' '.join(argv))}[/bold]")
        return main(argv)

    reports: list[Path] = []

    def report(state: PipelineState) -> None:
        reports.extend(write_report(pipeline, state, home))

    steps_run, _ = run_pipeline(pipeline, home=home, execute=execute, before_serve=report)
    skipped = [s.stage.id for s in steps_run if s.action == "skip"]
    if skipped:
        out.print(f"[dim]unchanged since the last demo, skipped: {', '.join(skipped)}[/dim]")
    model = str(pipeline.stage("register").options["alias"])  # served by its alias

    out.rule("[bold]serve → key → OpenAI client → usage, bill, lineage[/bold]")
    with _server(model, home) as url:
        key_name, secret = _new_key(home)
        out.print(f"key [bold]{key_name}[/bold] created (shown once): {secret[:12]}…")
        usage, request_id = _stream(url, secret, model, tokens)
    _receipt(home, request_id, key_name, usage)
    out.print(
        f"pipeline report: {escape(str(reports[0]))}\n                 {escape(str(reports[1]))}"
    )
    out.print(
        f"dashboard: lmforge serve {model}, then open http://127.0.0.1:8000/dashboard and sign "
        "in with an admin key (lmforge keys create --name me --admin)"
    )
    again = escape(f"lmforge pipeline run {demo_pipeline_file()}")
    out.print(f"[dim]the whole pipeline again: {again}[/dim]")


@contextmanager
def _server(model: str, home: Path) -> Iterator[str]:
    """`lmforge serve MODEL` on a free loopback port in its own process, until the block ends."""
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    log_path = home / "logs" / "demo-serve.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = ["serve", model, "--host", "127.0.0.1", "--port", str(port)]
    out.print(f"[bold]$ lmforge {' '.join(argv)}[/bold]  [dim](log: {escape(str(log_path))})[/dim]")
    env = {**os.environ, "LMFORGE_HOME": str(home)}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "lmforge.cli.main", *argv],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise LmforgeError(f"the demo server exited ({process.returncode}); see {log_path}")
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise LmforgeError(f"the demo server was not ready in 120 s; see {log_path}")
            time.sleep(0.2)
        out.print(f"serving {model} at {url}/v1")
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _new_key(home: Path) -> tuple[str, str]:
    from lmforge.ops.accounts import create_key
    from lmforge.registry.db import connect

    name = f"demo-{secrets.token_hex(3)}"
    engine = connect(home=home)
    try:
        return name, create_key(engine, actor="lmforge demo", name=name)[1]
    finally:
        engine.dispose()


def _stream(url: str, secret: str, model: str, tokens: int) -> tuple[Any, str]:
    """Stream a completion through the official client, printing it; (usage, request id)."""
    from openai import APIError, OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0, timeout=120)
    out.print(
        f'[dim]client.completions.create(model="{model}", prompt={PROMPT!r}, '
        f"max_tokens={tokens}, stream=True)[/dim]"
    )
    out.print(f"[bold]{escape(PROMPT)}[/bold]", end="")
    usage = None
    try:
        with client.completions.with_streaming_response.create(
            model=model,
            prompt=PROMPT,
            max_tokens=tokens,
            temperature=0.8,
            seed=1,
            stream=True,
            stream_options={"include_usage": True},
        ) as response:
            request_id = response.headers.get("x-request-id", "")
            for chunk in response.parse():
                if chunk.choices:
                    out.print(escape(chunk.choices[0].text), end="")
                if chunk.usage is not None:
                    usage = chunk.usage
    except APIError as exc:
        raise LmforgeError(f"the demo request failed: {exc}") from None
    out.print()
    if usage is None or not request_id:
        raise LmforgeError("the stream ended without usage or a request id")
    return usage, request_id


def _receipt(home: Path, request_id: str, key_name: str, usage: Any) -> None:
    """Usage, the bill and the lineage of REQUEST_ID, read back from the ledger."""
    from lmforge.cli.ops import lineage_tree
    from lmforge.ops.billing import build_invoice
    from lmforge.ops.lineage import request_lineage
    from lmforge.ops.pricing import format_usd
    from lmforge.registry import ledger
    from lmforge.registry.db import read_existing

    record = None
    deadline = time.monotonic() + 10  # the server settles the request as the stream ends
    while record is None:
        with read_existing(home=home) as conn:
            record = None if conn is None else ledger.get_usage(conn, request_id=request_id)
        if record is None:
            if time.monotonic() > deadline:
                raise LmforgeError(f"request {request_id} is not in the ledger")
            time.sleep(0.1)
    table = Table(title=f"request {request_id}", title_justify="left", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("model version", str(record.model_version))
    table.add_row(
        "usage (stream)",
        f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens",
    )
    table.add_row(
        "usage (ledger)",
        f"{record.prompt_tokens} prompt + {record.completion_tokens} completion tokens",
    )
    table.add_row(
        "latency", f"{record.latency_ms:,.0f} ms (first token {record.ttft_ms or 0:.0f} ms)"
    )
    table.add_row("cost", format_usd(record.cost_nusd, places=9))
    with read_existing(home=home) as conn:
        assert conn is not None
        invoice = build_invoice(conn, period=record.created_at[:7], key=key_name)
    table.add_row(
        "bill",
        f"invoice {invoice.number}: {len(invoice.lines)} line(s), total "
        f"{format_usd(invoice.total_nusd, places=9)} (lmforge bill --period "
        f"{invoice.period} --key {key_name})",
    )
    out.print(table)
    out.print("[bold]lineage of this request[/bold] (lmforge lineage " + request_id + ")")
    out.print(lineage_tree(request_lineage(request_id, home=home)))


def register(app: typer.Typer) -> None:
    app.command(
        "demo",
        epilog="[bold]Examples[/bold]\n\n  lmforge demo\n\n  make demo\n\n"
        "  lmforge demo --train-steps 0      # the built-in model only",
    )(demo_command)
