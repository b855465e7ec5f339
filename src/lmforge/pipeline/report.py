"""The report at the end of a pipeline: `report.md` and a self-contained `report.html`.

Both show the stages (ran or skipped, seconds), the data funnel of every data stage, the loss
curve of every training stage, the eval results, the economics of the last model made, and its
lineage graph. Everything comes from what the stages recorded (manifests, runs, the registry),
read the way `lmforge data show`, `lmforge eval`, `lmforge economics` and `lmforge lineage` read
it. The HTML page needs nothing from the network: images are inlined as data URIs and every
string from a file or the registry is escaped.
"""

from __future__ import annotations

import base64
import html
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.atomic import write_bytes_atomic, write_text_atomic
from lmforge.data.report import funnel_rows
from lmforge.errors import LmforgeError
from lmforge.ops.economics import economics, economics_rows
from lmforge.ops.lineage import LineageNode, model_lineage, read_json_object
from lmforge.pipeline.run import PipelineState, newest_eval, pipeline_dir
from lmforge.pipeline.spec import Pipeline, Stage
from lmforge.registry import repo
from lmforge.registry.db import read_existing
from lmforge.train.loop import read_metrics
from lmforge.train.observe import LOSS_PNG, plot_losses

log = logging.getLogger(__name__)


@dataclass
class Facts:
    name: str
    file: str
    stages: list[dict[str, Any]] = field(default_factory=list)
    funnels: list[tuple[str, list[tuple[str, int, int | None, float]]]] = field(
        default_factory=list
    )
    curves: list[tuple[str, Path, str]] = field(default_factory=list)  # stage, png, summary
    evals: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    economics: tuple[str, list[tuple[str, str]]] | None = None
    lineage: LineageNode | None = None
    notes: list[str] = field(default_factory=list)  # what could not be shown, and why


def write_report(pipeline: Pipeline, state: PipelineState, home: Path) -> tuple[Path, Path]:
    """Write the report of PIPELINE's last runs; (report.md, report.html)."""
    facts = gather(pipeline, state, home)
    out = pipeline_dir(home, pipeline.name)
    md, page = out / "report.md", out / "report.html"
    for stage, png, _ in facts.curves:
        write_bytes_atomic(out / f"loss-{stage}.png", png.read_bytes())
    write_text_atomic(md, render_markdown(facts))
    write_text_atomic(page, render_html(facts))
    return md, page


def gather(pipeline: Pipeline, state: PipelineState, home: Path) -> Facts:
    facts = Facts(pipeline.name, str(pipeline.path))
    last_model: str | None = None
    for stage in pipeline.stages:
        s = state.stages.get(stage.id)
        facts.stages.append(
            {
                "id": stage.id,
                "kind": stage.kind,
                "status": "not run" if s is None else s.status,
                "seconds": None if s is None else s.seconds,
                "output": None if s is None else s.output,
                "command": "lmforge " + " ".join(stage.argv()),
            }
        )
        if s is None or s.status != "done":
            continue
        artifact, name = stage.output or ("", "")
        if artifact == "dataset":
            manifest = home / "datasets" / name / "manifest.json"
            try:
                facts.funnels.append((name, funnel_rows(read_json_object(manifest))))
            except (KeyError, IndexError, TypeError):
                facts.notes.append(f"data funnel of {name}: {manifest} is missing or unreadable")
        if artifact == "model":
            last_model = name
            curve = _loss_curve(name, home)
            if isinstance(curve, str):
                facts.notes.append(f"loss curve of {name}: {curve}")
            elif curve is not None:
                facts.curves.append((stage.id, *curve))
        if stage.kind == "eval":
            _add_eval(facts, stage, home)
    if last_model is not None:
        try:
            result = economics(
                last_model,
                hourly_usd=pipeline.report.hourly_usd,
                margin=pipeline.report.margin,
                measure_seconds=pipeline.report.measure_seconds,
                home=home,
            )
            facts.economics = (f"{result.model} ({result.model_version})", economics_rows(result))
        except LmforgeError as exc:
            facts.notes.append(f"economics of {last_model}: {exc}")
        facts.lineage = model_lineage(last_model, home=home)
    return facts


def _loss_curve(name: str, home: Path) -> tuple[Path, str] | str | None:
    """(loss.png, summary) of the run that made model NAME's newest version; a reason if it
    cannot be drawn; None for a model no run made (a quantized copy)."""
    with read_existing(home=home) as conn:
        record = None if conn is None else repo.get_model(conn, name=name)
    if record is None:
        return "not in the registry"
    run_id = read_json_object(record.path / "lmforge.json").get("run_id")
    if not run_id:
        return None
    run_dir = home / "runs" / str(run_id)
    rows = read_metrics(run_dir)
    if not rows:
        return f"{run_dir / 'metrics.jsonl'} is missing or empty"
    steps = [r for r in rows if "loss" in r]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    if not steps:
        return "no steps recorded"
    png = run_dir / LOSS_PNG
    if not png.is_file():
        png = plot_losses(run_dir, title=name)
    summary = f"{len(steps)} steps, last train loss {steps[-1]['loss']:.4f}"
    if vals:
        summary += f", last val loss {vals[-1]:.4f}"
    return png, summary


def _add_eval(facts: Facts, stage: Stage, home: Path) -> None:
    record = newest_eval(stage, home)
    if record is None:
        model = stage.options["model"]
        facts.notes.append(f"no recorded eval of {model} (was it run with --no-record?)")
        return
    metrics = {k: v for k, v in record.metrics.items() if isinstance(v, (int, float, str))}
    if record.contamination_rate is not None:
        metrics["contamination"] = f"{record.contamination_rate:.1%}"
    facts.evals.append((record.model, record.task, metrics))


# ---------------------------------------------------------------------------------------------
# Rendering


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _lineage_lines(node: LineageNode, depth: int = 0) -> list[str]:
    details = ", ".join(f"{k}: {v}" for k, v in node.details.items())
    missing = f" (missing: {node.missing})" if node.missing else ""
    line = f"{'  ' * depth}- **{node.kind}** {node.label}{missing}" + (
        f" — {details}" if details else ""
    )
    return [line] + [x for c in node.children for x in _lineage_lines(c, depth + 1)]


def render_markdown(facts: Facts) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out = [f"# Pipeline {facts.name}", "", f"From `{facts.file}`, {when}.", "", "## Stages", ""]
    out += ["| stage | kind | status | seconds | output |", "| --- | --- | --- | ---: | --- |"]
    for s in facts.stages:
        out.append(
            f"| {s['id']} | {s['kind']} | {s['status']} | {_seconds(s['seconds'])} "
            f"| {s['output'] or ''} |"
        )
    for name, rows in facts.funnels:
        out += ["", f"## Data funnel: {name}", "", "| step | documents | characters | kept |",
                "| --- | ---: | ---: | ---: |"]  # fmt: skip
        out += [f"| {step} | {d:,} | {_fmt(c) if c is not None else ''} | {k:.1%} |"
                for step, d, c, k in rows]  # fmt: skip
    for stage, _, summary in facts.curves:
        out += ["", f"## Loss: {stage}", "", f"![loss of {stage}](loss-{stage}.png)", "", summary]
    if facts.evals:
        out += ["", "## Evaluation", "", "| model | task | metrics |", "| --- | --- | --- |"]
        for model, task, metrics in facts.evals:
            shown = ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
            out.append(f"| {model} | {task} | {shown} |")
    if facts.economics:
        title, econ = facts.economics
        out += ["", f"## Economics: {title}", "", "| | |", "| --- | --- |"]
        out += [f"| {k} | {v} |" for k, v in econ]
    if facts.lineage:
        out += ["", "## Lineage", "", *_lineage_lines(facts.lineage)]
    if facts.notes:
        out += ["", "## Not shown", "", *[f"- {n}" for n in facts.notes]]
    return "\n".join(out) + "\n"


_CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:1000px;color:#1d2330}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #dde}
table{border-collapse:collapse;margin:.5rem 0}td,th{padding:.25rem .6rem;border:1px solid #dde}
th{background:#f3f4f8;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
.ran{color:#0a7a33}.skipped{color:#667}.failed,.running{color:#b3261e}
code{font-size:.85em;background:#f3f4f8;padding:0 .25rem}
ul.tree,ul.tree ul{list-style:none;padding-left:1.2rem;border-left:2px solid #cfd3e0}
ul.tree li{margin:.3rem 0}.kind{display:inline-block;min-width:5.5rem;font-weight:600}
.bar{display:inline-block;height:.7rem;background:#4b6bfb;vertical-align:middle}
img{max-width:100%;border:1px solid #dde}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _tree(node: LineageNode) -> str:
    details = "".join(f" · {_e(k)}: <code>{_e(v)}</code>" for k, v in node.details.items())
    missing = f" <span class='failed'>(missing: {_e(node.missing)})</span>" if node.missing else ""
    kids = "".join(f"<li>{_tree(c)}</li>" for c in node.children)
    body = f"<span class='kind'>{_e(node.kind)}</span> {_e(node.label)}{missing}{details}"
    return body + (f"<ul class='tree'>{kids}</ul>" if kids else "")


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def render_html(facts: Facts) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    parts = [
        f"<h1>Pipeline {_e(facts.name)}</h1><p>From <code>{_e(facts.file)}</code>, {when}.</p>"
    ]
    rows = "".join(
        f"<tr><td>{_e(s['id'])}</td><td>{_e(s['kind'])}</td>"
        f"<td class='{_e(s['status'])}'>{_e(s['status'])}</td>"
        f"<td class='n'>{_seconds(s['seconds'])}</td>"
        f"<td><code>{_e(s['command'])}</code></td></tr>"
        for s in facts.stages
    )
    parts.append(
        "<h2>Stages</h2><table><tr><th>stage</th><th>kind</th><th>status</th><th>seconds</th>"
        f"<th>command</th></tr>{rows}</table>"
    )
    for name, funnel in facts.funnels:
        body = "".join(
            f"<tr><td>{_e(step)}</td><td class='n'>{d:,}</td>"
            f"<td class='n'>{'' if c is None else _fmt(c)}</td>"
            f"<td><span class='bar' style='width:{kept * 200:.0f}px'></span> {kept:.1%}</td></tr>"
            for step, d, c, kept in funnel
        )
        parts.append(
            f"<h2>Data funnel: {_e(name)}</h2><table><tr><th>step</th><th>documents</th>"
            f"<th>characters</th><th>kept</th></tr>{body}</table>"
        )
    for stage, png, summary in facts.curves:
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(
            f"<h2>Loss: {_e(stage)}</h2><img alt='loss of {_e(stage)}' "
            f"src='data:image/png;base64,{data}'><p>{_e(summary)}</p>"
        )
    if facts.evals:
        body = "".join(
            f"<tr><td>{_e(m)}</td><td>{_e(t)}</td><td>"
            + ", ".join(f"{_e(k)} <b>{_e(_fmt(v))}</b>" for k, v in metrics.items())
            + "</td></tr>"
            for m, t, metrics in facts.evals
        )
        parts.append(
            "<h2>Evaluation</h2><table><tr><th>model</th><th>task</th><th>metrics</th></tr>"
            f"{body}</table>"
        )
    if facts.economics:
        title, econ = facts.economics
        body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in econ)
        parts.append(f"<h2>Economics: {_e(title)}</h2><table>{body}</table>")
    if facts.lineage:
        parts.append(f"<h2>Lineage</h2><ul class='tree'><li>{_tree(facts.lineage)}</li></ul>")
    if facts.notes:
        items = "".join(f"<li>{_e(n)}</li>" for n in facts.notes)
        parts.append(f"<h2>Not shown</h2><ul>{items}</ul>")
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>lmforge pipeline {_e(facts.name)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )
