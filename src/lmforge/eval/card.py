"""The model card: a model directory's `README.md`, generated from what lmforge recorded.

This file owns the card and the `evals` list in `lmforge.json`:

    write_card(model_dir)                      # README.md from lmforge.json (+ config.json, …)
    add_eval_result(model_dir, result)         # append to lmforge.json's "evals", regenerate

The card is a Hugging Face-style model card: a YAML front matter block (`library_name: lmforge`,
`base_model` when a parent is recorded, `pipeline_tag` from config.json's architectures), then
the model (architecture, shape, task, labels), how it was made (the lineage that
`train/pretrain.py` and `train/finetune.py` record: stage, parent, run, steps, tokens, time,
training data with its sha256, LoRA, head), a table of the evaluation results with their
contamination check, and how to use it. Everything comes from the directory's JSON files; the
card is regenerated in full each time, so edits to it are overwritten.

Every string a user chose (names, labels, paths) is escaped before it enters Markdown
(`escape_markdown`: pipes, newlines, emphasis and link characters, HTML) and front matter values
are JSON strings, which YAML reads as double-quoted scalars. Both files are written atomically
(`lmforge.atomic`); `add_eval_result` holds an exclusive `flock` on the directory while it reads,
appends and rewrites, so two evaluations finishing at once both land. torch-free.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.atomic import write_text_atomic
from lmforge.errors import CorruptArtifactError, LmforgeError

CARD_FILE = "README.md"
LINEAGE_FILE = "lmforge.json"  # model/formats/hf.py's LINEAGE_FILE (not imported: torch)
CONFIG_FILE = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
MAX_LABELS_SHOWN = 50

_PIPELINE_TAGS = {  # config.json architecture suffix → Hugging Face pipeline tag
    "ForCausalLM": "text-generation",
    "LMHeadModel": "text-generation",
    "ForSequenceClassification": "text-classification",
    "ForQuestionAnswering": "question-answering",
}
_TASK_TAGS = {"classify": "text-classification", "qa": "question-answering"}
# Backslash-escaped (CommonMark: any ASCII punctuation may be): code spans, emphasis, links,
# HTML and entities, GFM's table pipes and strikethrough. "(" needs none once "[" has one.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&])")
_LINE_BREAKS = re.compile(r"[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]+")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]*")  # usable as NAME in the usage snippet
_YAML_UNSAFE = re.compile(r"[\x85\u2028\u2029\ufeff]")  # line breaks / BOM to YAML, not to JSON


def escape_markdown(text: object) -> str:
    """TEXT as one line of literal Markdown: safe in a table cell, a heading or a sentence."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", _LINE_BREAKS.sub(" ", str(text))).strip()


def write_card(model_dir: str | Path) -> Path:
    """Write MODEL_DIR/README.md from its lmforge.json (and config.json, adapter_config.json)."""
    d = _model_dir(model_dir)
    with _locked(d):
        return _write_card(d)


def add_eval_result(model_dir: str | Path, result: dict[str, Any]) -> None:
    """Append RESULT to the "evals" list of MODEL_DIR's lmforge.json and regenerate the card.

    RESULT is one evaluation as `lmforge eval` reports it: {"task", "model", "data": {"path",
    "sha256", "examples"}, "metrics", "contamination" (or None: not checked), "seconds",
    "created_at"}. Every other key of lmforge.json is kept; a directory without one gets one.
    """
    d = _model_dir(model_dir)
    if not isinstance(result, dict) or not isinstance(result.get("task"), str):
        raise LmforgeError('an eval result must be a JSON object with a "task" string')
    with _locked(d):
        record = _read_json(d / LINEAGE_FILE)
        evals = record.get("evals", [])
        if not isinstance(evals, list):
            raise CorruptArtifactError(f'{d / LINEAGE_FILE}: "evals" is not a list')
        record["evals"] = [*evals, result]
        try:
            text = json.dumps(record, indent=2, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise LmforgeError(f"eval result cannot be stored in {LINEAGE_FILE}: {e}") from e
        write_text_atomic(d / LINEAGE_FILE, text + "\n")
        _write_card(d)


def render_card(
    lineage: dict[str, Any],
    config: dict[str, Any],
    adapter: dict[str, Any],
    *,
    model_dir: Path,
) -> str:
    """The card's Markdown from the three JSON files' contents ({} for a missing file)."""
    name = str(lineage.get("name") or model_dir.name)
    head = _head(lineage, config, adapter)
    parts = [
        _front_matter(lineage, config, adapter, head),
        f"# {escape_markdown(name)}\n\n{_summary(lineage, adapter, head)}\n",
        _model_section(lineage, config, adapter, head),
        _made_section(lineage),
        _eval_section(lineage),
        _usage_section(lineage, head, name, model_dir),
        "---\n\nThis card is generated by lmforge from the directory's `lmforge.json` and "
        "`config.json`; edits to it are overwritten.\n",
    ]
    return "\n".join(parts)


# -- files -------------------------------------------------------------------------------------


def _model_dir(model_dir: str | Path) -> Path:
    d = Path(model_dir)
    if not d.is_dir():
        raise LmforgeError(f"{d} is not a model directory")
    return d


@contextlib.contextmanager
def _locked(d: Path) -> Iterator[None]:
    """An exclusive flock on directory D (not reentrant: never nest it)."""
    fd = os.open(d, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_card(d: Path) -> Path:
    card = render_card(
        _read_json(d / LINEAGE_FILE),
        _read_json(d / CONFIG_FILE),
        _read_json(d / ADAPTER_CONFIG),
        model_dir=d,
    )
    path = d / CARD_FILE
    write_text_atomic(path, card)
    return path


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptArtifactError(f"{path}: cannot read it as JSON: {e}") from e
    if not isinstance(data, dict):
        raise CorruptArtifactError(f"{path}: not a JSON object")
    return data


# -- front matter and summary ------------------------------------------------------------------


def _yaml_str(value: str) -> str:
    quoted = json.dumps(value, ensure_ascii=False)
    return _YAML_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", quoted)


def _pipeline_tag(
    lineage: dict[str, Any], config: dict[str, Any], head: dict[str, Any] | None
) -> str | None:
    """From config.json's architectures; else from the head, else any model lmforge made."""
    for arch in config.get("architectures") or []:
        for suffix, tag in _PIPELINE_TAGS.items():
            if str(arch).endswith(suffix):
                return tag
    if head is not None:
        return _TASK_TAGS.get(str(head.get("task")))
    return "text-generation" if lineage.get("model_config") or lineage.get("stage") else None


def _front_matter(
    lineage: dict[str, Any],
    config: dict[str, Any],
    adapter: dict[str, Any],
    head: dict[str, Any] | None,
) -> str:
    lines = ["---", "library_name: lmforge"]
    base = lineage.get("parent") or adapter.get("base_model_name_or_path")
    if base:
        lines.append(f"base_model: {_yaml_str(str(base))}")
    tag = _pipeline_tag(lineage, config, head)
    if tag is not None:
        lines.append(f"pipeline_tag: {tag}")
    if adapter:
        lines.append("tags:\n- lmforge\n- lora")
    else:
        lines.append("tags:\n- lmforge")
    return "\n".join([*lines, "---", ""])


def _summary(lineage: dict[str, Any], adapter: dict[str, Any], head: dict[str, Any] | None) -> str:
    task = str(head.get("task")) if head else str(lineage.get("task") or "")
    what = {
        "classify": "A text classifier",
        "qa": "An extractive question-answering model",
        "sft": "A chat model",
    }.get(task, "A language model")
    parent = lineage.get("parent")
    stage = lineage.get("stage")
    if stage == "finetune":
        how = "fine-tuned" + (f" from {escape_markdown(parent)}" if parent else "")
    elif stage == "pretrain":
        how = f"pretrained from {escape_markdown(parent)}" if parent else "pretrained from scratch"
    elif stage == "distill":
        how = f"distilled from {escape_markdown(parent)}"
    elif stage == "quantize":
        quant = lineage.get("quantization")
        method = quant.get("method") if isinstance(quant, dict) else None
        how = f"quantized ({escape_markdown(method)}) from {escape_markdown(parent)}"
    else:
        return f"{what} in lmforge's model directory layout (no training record)."
    lora = lineage.get("lora")
    rank = lora.get("rank") if isinstance(lora, dict) else adapter.get("r")
    suffix = f" (LoRA adapters, rank {escape_markdown(rank)})" if rank is not None else ""
    return f"{what} {how} with lmforge{suffix}."


# -- the model ---------------------------------------------------------------------------------


def _head(
    lineage: dict[str, Any], config: dict[str, Any], adapter: dict[str, Any]
) -> dict[str, Any] | None:
    """The task head's record (task, labels, pooling), or None for a language model."""
    for head in (config.get("lmforge_head"), lineage.get("head"), adapter.get("head")):
        if isinstance(head, dict) and head.get("task"):
            return head
    for arch in config.get("architectures") or []:  # a head model made elsewhere
        if str(arch).endswith("ForSequenceClassification"):
            return {"task": "classify"}
        if str(arch).endswith("ForQuestionAnswering"):
            return {"task": "qa"}
    return None


def _shape_source(config: dict[str, Any], lineage: dict[str, Any]) -> dict[str, Any]:
    """The model's shape in lmforge's vocabulary, from config.json or lmforge.json."""
    ours = config.get("lmforge_config") or lineage.get("model_config") or {}
    if not isinstance(ours, dict):
        ours = {}

    def pick(our: str, *hf: str) -> Any:
        for key in hf:
            if config.get(key) is not None:
                return config[key]
        return ours.get(our)

    shape = {
        "arch": ours.get("arch") or config.get("model_type"),
        "n_layer": pick("n_layer", "num_hidden_layers", "n_layer"),
        "d_model": pick("d_model", "hidden_size", "n_embd"),
        "n_head": pick("n_head", "num_attention_heads", "n_head"),
        "n_kv_head": pick("n_kv_head", "num_key_value_heads"),
        "d_ff": pick("d_ff", "intermediate_size", "n_inner"),
        "vocab_size": pick("vocab_size", "vocab_size"),
        "max_seq_len": pick("max_seq_len", "max_position_embeddings", "n_positions"),
    }
    return {k: v for k, v in shape.items() if v is not None}


def _labels(config: dict[str, Any], head: dict[str, Any] | None) -> list[str]:
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        try:
            return [str(v) for _, v in sorted(id2label.items(), key=lambda kv: int(kv[0]))]
        except ValueError:
            return [str(v) for v in id2label.values()]
    return [str(x) for x in (head or {}).get("labels") or []]


def _model_section(
    lineage: dict[str, Any],
    config: dict[str, Any],
    adapter: dict[str, Any],
    head: dict[str, Any] | None,
) -> str:
    rows: list[tuple[str, str]] = []
    architectures = config.get("architectures") or []
    shape = _shape_source(config, lineage)
    if architectures:
        arch = ", ".join(escape_markdown(a) for a in architectures)
        if shape.get("arch"):
            arch += f" ({escape_markdown(shape['arch'])})"
        rows.append(("Architecture", arch))
    elif adapter:
        base = escape_markdown(adapter.get("base_model_name_or_path") or "?")
        arch = escape_markdown(shape.get("arch", "?"))
        rows.append(("Architecture", f"LoRA adapters on {base} ({arch})"))
    elif shape.get("arch"):
        rows.append(("Architecture", escape_markdown(shape["arch"])))
    if "n_layer" in shape:
        rows.append(("Layers", _int(shape["n_layer"])))
    if "d_model" in shape:
        rows.append(("Hidden size", _int(shape["d_model"])))
    if "n_head" in shape:
        heads = _int(shape["n_head"])
        kv = shape.get("n_kv_head")
        if kv is not None and kv != shape["n_head"]:
            heads += f" ({_int(kv)} key/value)"
        rows.append(("Attention heads", heads))
    if "d_ff" in shape:
        rows.append(("MLP size", _int(shape["d_ff"])))
    if "vocab_size" in shape:
        rows.append(("Vocabulary", _int(shape["vocab_size"])))
    if "max_seq_len" in shape:
        rows.append(("Context length", _int(shape["max_seq_len"])))
    task = (head or {}).get("task") or lineage.get("task")
    rows.append(("Task", escape_markdown(task) if task else "text generation"))
    if head is not None and head.get("pooling"):
        rows.append(("Pooling", escape_markdown(head["pooling"])))
    labels = _labels(config, head)
    if labels:
        shown = ", ".join(escape_markdown(x) for x in labels[:MAX_LABELS_SHOWN])
        more = f", … ({len(labels)} labels)" if len(labels) > MAX_LABELS_SHOWN else ""
        rows.append(("Labels", shown + more))
    if lineage.get("weights_sha256"):
        rows.append(("Weights sha256", escape_markdown(lineage["weights_sha256"])))
    return "## Model\n\n" + _key_table(rows)


# -- how it was made ---------------------------------------------------------------------------


def _made_section(lineage: dict[str, Any]) -> str:
    if not lineage.get("stage"):
        return "## How it was made\n\nNot recorded: this model was not trained by lmforge.\n"
    rows: list[tuple[str, str]] = [("Stage", escape_markdown(lineage["stage"]))]
    parent = lineage.get("parent")
    rows.append(("Parent", escape_markdown(parent) if parent else "none (trained from scratch)"))
    for key, label in (("run_id", "Run"), ("strategy", "Strategy")):
        if lineage.get(key):
            rows.append((label, escape_markdown(lineage[key])))
    if lineage.get("steps") is not None:
        rows.append(("Steps", _int(lineage["steps"])))
    if lineage.get("tokens_seen") is not None:
        rows.append(("Tokens seen", _int(lineage["tokens_seen"])))
    if lineage.get("wall_seconds") is not None:
        wall = _duration(lineage["wall_seconds"])
        world = lineage.get("world_size")
        if isinstance(world, int) and world > 1:
            wall += f" on {world} processes"
        rows.append(("Wall time", wall))
    if lineage.get("cpu_seconds") is not None:
        rows.append(("CPU time", _duration(lineage["cpu_seconds"])))
    dataset = lineage.get("dataset")
    if isinstance(dataset, dict):
        text = f"data set {escape_markdown(dataset.get('name') or '?')}"
        if dataset.get("path"):
            text += f" at {escape_markdown(dataset['path'])}"
        if dataset.get("content_key"):
            text += f" (content key {escape_markdown(dataset['content_key'])})"
        rows.append(("Training data", text))
    task_data = lineage.get("task_data")
    if isinstance(task_data, dict):
        facts = []
        if task_data.get("sha256"):
            facts.append(f"sha256 {escape_markdown(task_data['sha256'])}")
        if task_data.get("format"):
            facts.append(f"format {escape_markdown(task_data['format'])}")
        if task_data.get("examples") is not None:
            facts.append(f"{_int(task_data['examples'])} examples")
        text = escape_markdown(task_data.get("path") or "?")
        rows.append(("Training data", text + (f" ({', '.join(facts)})" if facts else "")))
    if "lora" in lineage:
        rows.append(("LoRA", _lora(lineage["lora"])))
    head = lineage.get("head")
    if isinstance(head, dict):
        labels = head.get("labels") or []
        text = escape_markdown(head.get("task", "?"))
        if head.get("pooling"):
            text += f", {escape_markdown(head['pooling'])} pooling"
        if labels:
            text += f", {len(labels)} labels"
        rows.append(("Head", text))
    losses = lineage.get("eval")
    if isinstance(losses, dict):
        shown = [
            f"{label} {_num(losses[key], '.4f')}"
            for key, label in (("train_loss", "train"), ("val_loss", "validation"))
            if losses.get(key) is not None
        ]
        if shown:
            rows.append(("Final loss", ", ".join(shown)))
    return "## How it was made\n\n" + _key_table(rows)


def _lora(lora: Any) -> str:
    if not isinstance(lora, dict):
        return "none (every weight trained)"
    targets = lora.get("targets") or []
    return (
        f"rank {escape_markdown(lora.get('rank', '?'))}, "
        f"alpha {escape_markdown(lora.get('alpha', '?'))}, "
        f"targets {escape_markdown(', '.join(str(t) for t in targets) or '?')}, "
        f"dropout {escape_markdown(lora.get('dropout', 0))}"
    )


# -- evaluation results ------------------------------------------------------------------------


def _eval_section(lineage: dict[str, Any]) -> str:
    evals = [e for e in lineage.get("evals") or [] if isinstance(e, dict)]
    if not evals:
        return "## Evaluation results\n\nNo evaluation recorded yet.\n"
    lines = [
        "## Evaluation results\n",
        "| Task | Data | Examples | Metrics | Contamination | Date |",
        "|---|---|---:|---|---|---|",
    ]
    for result in evals:
        data = result.get("data")
        if not isinstance(data, dict):
            data = {}
        cells = [
            escape_markdown(result.get("task", "?")),
            _data_cell(data),
            _int(data["examples"]) if data.get("examples") is not None else "?",
            _metrics_cell(str(result.get("task")), result.get("metrics")),
            _contamination_cell(result.get("contamination")),
            escape_markdown(str(result.get("created_at") or "?")[:10]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _data_cell(data: dict[str, Any]) -> str:
    text = escape_markdown(data.get("path") or "?")
    if data.get("sha256"):
        text += f" (sha256 {escape_markdown(str(data['sha256'])[:12])})"
    return text


_HEADLINE_METRICS: dict[str, tuple[tuple[str, str, str], ...]] = {
    # task → (metric key, label, format) shown in the table, in order
    "perplexity": (("perplexity", "perplexity", ".3f"), ("bits_per_byte", "bits/byte", ".4f")),
    "classify": (("accuracy", "accuracy", ".4f"), ("macro_f1", "macro F1", ".4f")),
    "qa": (("exact_match", "exact match", ".2f"), ("f1", "F1", ".2f")),
    "bleu": (("bleu", "BLEU", ".2f"), ("chrf", "chrF", ".2f")),
}


def _metrics_cell(task: str, metrics: Any) -> str:
    if not isinstance(metrics, dict) or not metrics:
        return "?"
    if task == "classify" and "macro_f1" not in metrics and "f1" in metrics:
        metrics = {**metrics, "macro_f1": metrics["f1"]}  # eval/tasks.py's f1 is the macro F1
    wanted = _HEADLINE_METRICS.get(task)
    if wanted is None:  # a task this card does not know: its first few numbers
        wanted = tuple(
            (k, k, ".4g") for k, v in metrics.items() if isinstance(v, int | float) and k
        )[:3]
    shown = [f"{label} {_num(metrics[key], fmt)}" for key, label, fmt in wanted if key in metrics]
    return escape_markdown(", ".join(shown)) if shown else "?"


def _contamination_cell(report: Any) -> str:
    if not isinstance(report, dict) or report.get("example_rate") is None:
        return "not checked"
    rate = _percent(report["example_rate"])
    n = report.get("n", "?")
    sources = [s for s in report.get("sources") or [] if isinstance(s, dict)]
    if report.get("complete") is False:
        checked = sum(1 for s in sources if s.get("status") == "checked")
        return escape_markdown(
            f"incomplete: ngram overlap {rate} of examples ({n}-grams) in the "
            f"{checked} of {len(sources)} sources that could be checked"
        )
    plural = "" if len(sources) == 1 else "s"
    return escape_markdown(
        f"ngram overlap: {rate} of examples ({n}-grams), checked against "
        f"{len(sources)} source{plural}"
    )


# -- usage -------------------------------------------------------------------------------------


def _usage_section(
    lineage: dict[str, Any], head: dict[str, Any] | None, name: str, model_dir: Path
) -> str:
    spec = name if lineage.get("name") and _PLAIN_NAME.fullmatch(name) else str(model_dir)
    task = (head or {}).get("task")
    if task in ("classify", "qa"):
        route, body = (
            ("classifications", {"model": spec, "input": "a fine film"})
            if task == "classify"
            else (
                "answers",
                {"model": spec, "question": "Who wrote it?", "context": "It was written by Ann."},
            )
        )
        commands = [
            f"lmforge serve {shlex.quote(spec)} --port 8000",
            f"curl http://127.0.0.1:8000/v1/{route} -H 'Content-Type: application/json' \\\n"
            f"  -d {shlex.quote(json.dumps(body))}",
        ]
    else:
        chat = " --chat" if lineage.get("task") == "sft" else ""
        commands = [f"lmforge generate {shlex.quote(spec)} 'Once upon a time' -n 64{chat}"]
    text = "\n".join(commands)
    fence = "```"
    while fence in text:
        fence += "`"
    return f"## Usage\n\n{fence}bash\n{text}\n{fence}\n"


# -- formatting --------------------------------------------------------------------------------


def _key_table(rows: list[tuple[str, str]]) -> str:
    lines = ["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)]
    return "\n".join(lines) + "\n"


def _int(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "?"


def _num(value: Any, fmt: str) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format(value, fmt)
    return escape_markdown(value)


def _percent(rate: Any) -> str:
    if not isinstance(rate, int | float):
        return "?%"
    if 0 < rate < 0.0005:
        return "< 0.1%"
    return f"{100 * rate:.1f}%"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    text = f"{seconds:,.1f} s"
    if seconds >= 3600:
        text += f" ({int(seconds // 3600)} h {int(seconds % 3600 // 60)} min)"
    elif seconds >= 60:
        text += f" ({int(seconds // 60)} min {int(seconds % 60)} s)"
    return text
