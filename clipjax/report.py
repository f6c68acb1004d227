"""A one-page PNG of a run's curves, from ``WORKDIR/metrics.jsonl`` (read back here).

``write_report(workdir)`` draws one panel per question, each only when it has data:
training loss; logit scale from 0 (SigLIP bias on its own right axis); in-batch training
accuracy; evaluation (zero-shot top-1/top-5, retrieval recalls); throughput in samples/s;
MFU in percent; learning rate. It writes ``WORKDIR/report.png`` and returns its path.
``make_figure(rows)`` builds the same figure without saving it.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot

from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from clipjax.metrics import METRICS_FILE  # noqa: E402

REPORT_FILE = "report.png"

log = logging.getLogger("clipjax")


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


def _last(k: str) -> str:
    return k.rsplit("/", 1)[-1]


def _is_loss(k: str) -> bool:
    return k.startswith("train/") and _last(k).startswith("loss")


def _is_scale(k: str) -> bool:
    return k.startswith("train/") and _last(k) in ("scale", "logit_scale", "temperature")


def _is_bias(k: str) -> bool:
    return k.startswith("train/") and _last(k) in ("bias", "logit_bias")


def _is_train_accuracy(k: str) -> bool:
    return k.startswith("train/") and "acc" in _last(k)


def _is_eval_metric(k: str) -> bool:
    return ((k.startswith("zeroshot/") and _last(k) in ("top1", "top5"))
            # recalls only: ranks, counts and similarities live on other scales
            or (k.startswith("retrieval/") and "_r" in _last(k) and "rank" not in _last(k)))


@dataclasses.dataclass(frozen=True)
class Panel:
    """One subplot: which keys go on the left (and right) axis and how the axis reads."""

    title: str
    left: Callable[[str], bool]
    ylabel: str
    right: Callable[[str], bool] = lambda k: False
    ylabel_right: str = ""
    from_zero: bool = False  # the axis starts at 0, so a drift of a few percent is not magnified into a cliff
    unit_interval: bool = False  # fractions, drawn on [0, 1]
    percent: bool = False  # fractions, drawn as percent
    markers: bool = False  # sparse curves (evaluations) get a marker per point


PANELS = (
    Panel("training loss", _is_loss, "loss"),
    Panel("logit scale", _is_scale, "scale (exp of the learnable log-scale)", _is_bias, "bias", from_zero=True),
    Panel("in-batch accuracy (train)", _is_train_accuracy, "top-1 in the batch", unit_interval=True),
    Panel("evaluation", _is_eval_metric, "accuracy / recall", unit_interval=True, markers=True),
    Panel("throughput", lambda k: _last(k) == "samples_per_sec", "samples/s", from_zero=True),
    Panel("MFU", lambda k: _last(k) == "mfu", "model FLOPs utilisation (%)", from_zero=True, percent=True),
    Panel("learning rate", lambda k: _last(k) == "lr", "learning rate"),
)


def _keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for k, v in row.items():
            if k != "step" and not isinstance(v, str):
                seen.setdefault(k, None)
    return list(seen)


def _series(rows, keys: list[str]) -> list[tuple[str, list[int], list[float]]]:
    """(key, steps, values) of each key that has at least one finite value."""
    out = []
    for k in keys:
        steps, values = iter_series(rows, k)
        if any(math.isfinite(v) for v in values):
            out.append((k, steps, values))
    return out


def _draw(ax, series, panel: Panel) -> None:
    for k, steps, values in series:
        if panel.percent:
            values = [100 * v for v in values]
        marker = "o" if panel.markers and len(steps) <= 30 else None
        ax.plot(steps, values, label=k, marker=marker, markersize=3, linewidth=1.2)
    if panel.unit_interval:
        ax.set_ylim(0, 1.02)
    elif panel.from_zero:
        ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1] * 1.1, 1e-9))  # headroom for the legend


def _single_step(series) -> bool:
    return len({s for _, steps, _ in series for s in steps}) == 1


def _draw_bars(ax, series, chance: Mapping[str, float]) -> None:
    """One evaluation step (e.g. only the final eval): a bar per metric, its chance level a dashed tick."""
    labels = [k for k, _, _ in series]
    values = [v[-1] for _, _, v in series]
    ax.barh(labels, values, color="tab:blue", alpha=0.8)
    for i, (k, v) in enumerate(zip(labels, values)):
        ax.text(min(v, 0.9) + 0.01, i, f"{v:.3f}", va="center", fontsize=7)
        if k in chance:
            ax.plot([chance[k]] * 2, [i - 0.4, i + 0.4], "k--", linewidth=1, label="chance" if i == 0 else None)
    ax.set_xlim(0, 1.02)
    ax.tick_params(axis="y", labelsize=7)


def make_figure(rows: Sequence[dict[str, Any]], title: str = "",
                chance: Mapping[str, float] | None = None) -> Figure:
    """The report figure for ``rows`` of a ``metrics.jsonl``; close it with ``plt.close(fig)``.

    ``chance``: chance levels by metric key (the evaluation files'), drawn when the run has one eval step.
    """
    keys = _keys(rows)
    panels = [(p, _series(rows, [k for k in keys if p.left(k)]), _series(rows, [k for k in keys if p.right(k)]))
              for p in PANELS]
    panels = [(p, left, right) for p, left, right in panels if left or right]
    ncols = 1 if len(panels) <= 1 else 2
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 3.4 * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax, (panel, left, right) in zip(flat, panels):
        if panel.markers and _single_step(left):
            _draw_bars(ax, left, chance or {})
            ax.set_title(f"{panel.title} (step {left[0][1][0]})")
            ax.set_xlabel(panel.ylabel)
            if any(k in (chance or {}) for k, _, _ in left):
                ax.legend(loc="lower right", fontsize=7)
            continue
        _draw(ax, left, panel)
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if left:
            ax.legend(loc="lower left" if panel.from_zero else "best", fontsize=7)
        if right:
            ax2 = ax.twinx()
            ax2.set_prop_cycle(color=["tab:red", "tab:purple"])
            _draw(ax2, right, dataclasses.replace(panel, from_zero=False))
            ax2.set_ylabel(panel.ylabel_right, color="tab:red")
            ax2.tick_params(axis="y", colors="tab:red")
            ax2.legend(loc="lower right", fontsize=7)
    for ax in flat[len(panels):]:
        ax.axis("off")
    if not panels:
        flat[0].text(0.5, 0.5, "no metrics logged yet", ha="center", va="center")
    steps = [r["step"] for r in rows if isinstance(r.get("step"), (int, float))]
    fig.suptitle(title + (f" (step {max(steps)})" if steps else ""))
    fig.tight_layout()
    return fig


def _chance_levels(workdir: str) -> dict[str, float]:
    """Chance levels from the evaluation files ``WORKDIR/eval_*.json`` (empty when none)."""
    out: dict[str, float] = {}
    for path in sorted(glob.glob(os.path.join(workdir, "eval_*.json"))):
        try:
            with open(path) as f:
                out.update(json.load(f).get("chance", {}))
        except (OSError, ValueError):
            continue  # a half-written or foreign file only costs the chance ticks
    return out


def write_report(workdir: str, rows: Sequence[dict[str, Any]] | None = None) -> str:
    """Reads ``WORKDIR/metrics.jsonl`` (or uses ``rows``), writes ``WORKDIR/report.png``; returns the path."""
    rows = list(read_metrics(workdir) if rows is None else rows)
    path = os.path.join(workdir, REPORT_FILE)
    fig = make_figure(rows, title=os.path.basename(os.path.abspath(workdir)), chance=_chance_levels(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path
