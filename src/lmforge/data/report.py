"""What a person reads about a data set: token-length statistics and their histogram (PNG).

`write_token_histogram` is called once by `prepare`; `funnel_rows` and `top_removals` turn a
manifest into the rows `lmforge data show` prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lmforge.atomic import write_with


def token_length_stats(doc_tokens: np.ndarray, bins: int = 40) -> dict[str, Any]:
    """Mean, percentiles and a log-spaced histogram of per-document token counts."""
    if doc_tokens.size == 0:
        return {"documents": 0}
    lengths = doc_tokens.astype(np.float64)
    low, high = max(1.0, float(lengths.min())), max(2.0, float(lengths.max()))
    edges = np.unique(np.geomspace(low, high + 1, bins + 1).round().astype(np.int64))
    counts, _ = np.histogram(doc_tokens, bins=edges)
    return {
        "documents": int(doc_tokens.size),
        "mean": round(float(lengths.mean()), 2),
        "p50": int(np.percentile(doc_tokens, 50)),
        "p90": int(np.percentile(doc_tokens, 90)),
        "p99": int(np.percentile(doc_tokens, 99)),
        "max": int(doc_tokens.max()),
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
    }


def write_token_histogram(path: Path, doc_tokens: np.ndarray, *, title: str) -> dict[str, Any]:
    """Draw the token-length histogram of the documents to PATH (PNG); return the statistics."""
    stats = token_length_stats(doc_tokens)
    if not stats["documents"]:
        return stats
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.asarray(stats["histogram"]["edges"])
    counts = np.asarray(stats["histogram"]["counts"])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.bar(
        edges[:-1], counts, width=np.diff(edges), align="edge", color="#4c72b0", edgecolor="white"
    )
    if edges[-1] / max(edges[0], 1) > 20:
        ax.set_xscale("log")
    ax.axvline(stats["p50"], color="#dd8452", linestyle="--", label=f"median {stats['p50']:,}")
    ax.axvline(stats["p90"], color="#c44e52", linestyle=":", label=f"p90 {stats['p90']:,}")
    ax.set_xlabel("tokens per document")
    ax.set_ylabel("documents")
    ax.set_title(f"{title}: {stats['documents']:,} documents, mean {stats['mean']:,.0f} tokens")
    ax.legend()
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return stats


def funnel_rows(manifest: dict[str, Any]) -> list[tuple[str, int, int | None, float]]:
    """(step, documents, chars, share of the raw documents kept) from raw to kept."""
    steps = manifest["funnel"]
    raw = max(1, steps[0]["documents"])
    return [(s["step"], s["documents"], s.get("chars"), s["documents"] / raw) for s in steps]


def top_removals(manifest: dict[str, Any], n: int = 10) -> list[tuple[str, int, int]]:
    """(reason, documents, chars) of the N reasons that removed the most documents."""
    removed = manifest.get("removed", {})
    rows = [(reason, r["documents"], r["chars"]) for reason, r in removed.items()]
    return sorted(rows, key=lambda r: (-r[1], r[0]))[:n]
