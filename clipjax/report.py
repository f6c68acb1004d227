"""A one-page PNG of a run's curves, from ``WORKDIR/metrics.jsonl`` (read back here).

``write_report(workdir)`` draws up to five panels (each only when it has data):
training loss; logit scale (and bias, on its own axis); accuracies (in-batch
``train/*acc*``, ``zeroshot/*/top1``, ``retrieval/*``); throughput with MFU on
a second axis; learning rate. Writes ``WORKDIR/report.png`` and returns its path.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot

from matplotlib import pyplot as plt  # noqa: E402

from clipjax.metrics import METRICS_FILE  # noqa: E402

REPORT_FILE = "report.png"

log = logging.getLogger(__name__)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` (or of ``DIR/metrics.jsonl`` given a directory).

    Blank and unparseable lines (a partial last line from a killed run) are skipped.
    A missing file gives ``[]``.
    """
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    rows: list[dict[str, Any]] = []
    if not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                log.warning("skipping unparseable line in %s: %.80s", path, line)
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def iter_series(rows: Iterable[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` over the rows that have it; null values become NaN."""
    steps, values = [], []
    for row in rows:
        if key not in row or row.get("step") is None:
            continue
        v = row[key]
        if isinstance(v, str):
            continue
        steps.append(int(row["step"]))
        values.append(float("nan") if v is None else float(v))
    return steps, values


def _keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for k, v in row.items():
            if k != "step" and not isinstance(v, str):
                seen.setdefault(k, None)
    return list(seen)


def _has_data(series: tuple[list[int], list[float]]) -> bool:
    return any(math.isfinite(v) for v in series[1])


def _select(keys: list[str], pred: Callable[[str], bool]) -> list[str]:
    return [k for k in keys if pred(k)]


def _is_loss(k: str) -> bool:
    return k.startswith("train/") and k.rsplit("/", 1)[-1].startswith("loss")


def _is_scale(k: str) -> bool:
    return k.startswith("train/") and k.rsplit("/", 1)[-1] in ("scale", "logit_scale", "temperature")


def _is_bias(k: str) -> bool:
    return k.startswith("train/") and k.rsplit("/", 1)[-1] in ("bias", "logit_bias")


def _is_accuracy(k: str) -> bool:
    last = k.rsplit("/", 1)[-1]
    return ((k.startswith("train/") and "acc" in last)
            or (k.startswith("zeroshot/") and last == "top1")
            # recalls only: ranks, counts and similarities live on other scales
            or (k.startswith("retrieval/") and "_r" in last and "rank" not in last))


def _plot(ax, rows, keys: list[str], marker_if_sparse: bool = True) -> bool:
    drawn = False
    for k in keys:
        steps, values = iter_series(rows, k)
        if not _has_data((steps, values)):
            continue
        marker = "o" if marker_if_sparse and len(steps) <= 30 else None
        ax.plot(steps, values, label=k, marker=marker, markersize=3, linewidth=1.2)
        drawn = True
    return drawn


def write_report(workdir: str, rows: Sequence[dict[str, Any]] | None = None) -> str:
    """Reads ``WORKDIR/metrics.jsonl`` (or uses ``rows``), writes ``WORKDIR/report.png``; returns the path."""
    rows = list(read_metrics(workdir) if rows is None else rows)
    keys = _keys(rows)
    last = lambda k: k.rsplit("/", 1)[-1]
    # (title, left keys, left label, right keys, right label, markers on sparse curves)
    specs = [
        ("training loss", _select(keys, _is_loss), "loss", [], "", False),
        ("logit scale / bias", _select(keys, _is_scale), "scale", _select(keys, _is_bias), "bias", False),
        ("accuracy", _select(keys, _is_accuracy), "accuracy", [], "", True),
        ("throughput", _select(keys, lambda k: k.endswith("samples_per_sec")), "samples/s",
         _select(keys, lambda k: last(k) == "mfu"), "MFU", False),
        ("learning rate", _select(keys, lambda k: last(k) == "lr"), "learning rate", [], "", False),
    ]
    has = lambda ks: any(_has_data(iter_series(rows, k)) for k in ks)
    panels = [s for s in specs if has(s[1]) or has(s[3])]

    path = os.path.join(workdir, REPORT_FILE)
    n = len(panels)
    ncols = 1 if n <= 1 else 2
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 3.6 * nrows), squeeze=False)
    try:
        flat = list(axes.flat)
        for ax, (title, left, ylabel, right, ylabel2, markers) in zip(flat, panels):
            _plot(ax, rows, left, markers)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="upper left", fontsize=7)
            if has(right):
                ax2 = ax.twinx()
                ax2.set_prop_cycle(color=["tab:red", "tab:purple", "tab:green"])
                _plot(ax2, rows, right, markers)
                ax2.set_ylabel(ylabel2)
                ax2.legend(loc="lower right", fontsize=7)
        for ax in flat[n:]:
            ax.axis("off")
        if not panels:
            flat[0].text(0.5, 0.5, "no metrics logged yet", ha="center", va="center")
        steps = [r["step"] for r in rows if isinstance(r.get("step"), (int, float))]
        title = os.path.basename(os.path.abspath(workdir))
        fig.suptitle(title + (f" (step {max(steps)})" if steps else ""))
        fig.tight_layout()
        os.makedirs(workdir, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path
