"""Console output of a run: what start-up is doing, one progress line per logged step, tables.

Start-up phases print when they begin and how long they took::

    compiling the train step...
    compiling the train step: done in 14.2s

A logged training step shows five fields, always in this order, within 120 columns (every
metric stays in ``metrics.jsonl`` and TensorBoard)::

    step 120/1000 | loss 3.2101 | 1,234 samples/s | MFU 12.3% | ETA 0:02:11

On a terminal they sit beside a tqdm bar redrawn in place; otherwise (a log file, a job
scheduler) each logged step is one plain line, flushed as it is printed. Rows without a
training loss (evaluations) are not shown as steps: evaluations print as a table.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import shutil
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Sequence, TextIO

ETA_KEY = "train/eta_sec"  # when the caller provides it, it is shown as the ETA rather than estimated
LOSS_KEY = "train/loss"
THROUGHPUT_KEY = "train/samples_per_sec"
MFU_KEY = "train/mfu"
MAX_COLUMNS = 120


def format_eta(seconds: float | None) -> str:
    """``H:MM:SS`` (hours may exceed 24); ``"?"`` when unknown or not finite."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    total = int(round(max(seconds, 0.0)))
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def format_value(value: Any) -> str:
    """Compact number formatting for stdout: ``3.2101``, ``1.2e-04``, ``12``, ``nan``."""
    if value is None:
        return "nan"
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        v = float(value)
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.1e}"
        return f"{v:.4f}"
    return str(value)


def format_cell(value: Any) -> str:
    """A table cell: floats to 4 significant digits (``1.235e+07`` from 1e5 up), anything else as ``str``."""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.4e}"
    return str(value)


def table_lines(rows: Sequence[Mapping[str, Any]], *, fmt: Callable[[Any], str] = format_value, header: bool = True,
                markdown: bool = False) -> list[str]:
    """The one table layout: columns are the union of the rows' keys (first seen first), cells ``fmt(value)``.

    Plain: left-aligned columns two spaces apart under a header and a dashed rule (``header``);
    ``markdown``: ``| a | b |`` rows under ``|---|---|``.
    """
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    cells = [[fmt(r[c]) if c in r else "" for c in cols] for r in rows]
    if markdown:
        row = lambda line: "| " + " | ".join(line) + " |"
        return [row(cols), "|" + "---|" * len(cols)] + [row(line) for line in cells]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ([cols, ["-" * w for w in widths]] if header else []) + cells
    return ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines]


def _finite(value: Any) -> float | None:
    if isinstance(value, numbers.Real) and math.isfinite(float(value)):
        return float(value)
    return None


def _rate(rate: float) -> str:
    """``12.3``, ``1,234``, ``1.23e+07``: short at every magnitude."""
    return f"{rate:.1f}" if rate < 100 else f"{rate:,.0f}" if rate < 1e7 else f"{rate:.2e}"


def step_fields(row: Mapping[str, Any], eta: float | None) -> str:
    """``loss 3.2101 | 1,234 samples/s | MFU 12.3% | ETA 0:02:11``; unknown values show as ``?``."""
    loss, rate, mfu = (_finite(row.get(k)) for k in (LOSS_KEY, THROUGHPUT_KEY, MFU_KEY))
    return " | ".join([
        f"loss {format_value(loss) if loss is not None else '?'}",
        f"{_rate(rate) if rate is not None else '?'} samples/s",
        f"MFU {f'{100 * mfu:.1f}%' if mfu is not None else '?'}",
        f"ETA {format_eta(eta)}",
    ])


class Progress:
    """Prints start-up phases, logged steps and tables to ``stream`` (default: ``sys.stdout`` at each write).

    ``interactive`` (default ``stream.isatty()``) draws a tqdm bar redrawn in place.
    ``total_steps`` is shown as ``step N/total`` and used for the ETA. A Progress that is
    not ``enabled`` (processes other than 0) prints nothing.
    """

    def __init__(self, *, total_steps: int | None = None, interactive: bool | None = None,
                 stream: TextIO | None = None, enabled: bool = True):
        self.total_steps = total_steps
        self.enabled = enabled
        self._stream, self._interactive = stream, interactive
        self._bar = None  # the tqdm bar, created at the first step shown on a terminal
        self._t0: tuple[int, float] | None = None  # (first step, time) for the ETA estimate

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    @property
    def interactive(self) -> bool:
        if self._interactive is not None:
            return self._interactive
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def note(self, message: str) -> None:
        """Prints one line (above the bar on a terminal)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
            self.stream.flush()
        else:
            print(message, file=self.stream, flush=True)

    @contextlib.contextmanager
    def phase(self, what: str) -> Iterator[None]:
        """Says ``what...`` now and ``what: done in 12.3s`` when the block ends."""
        self.note(f"{what}...")
        start = time.perf_counter()
        yield
        self.note(f"{what}: done in {time.perf_counter() - start:.1f}s")

    def step(self, step: int, row: Mapping[str, Any], now: float) -> None:
        """Shows a training row logged at ``step`` (``now``: perf_counter seconds); other rows are skipped."""
        if not self.enabled or LOSS_KEY not in row:
            return
        if self._t0 is None:
            self._t0 = (step, now)
        line = step_fields(row, self._eta(step, row, now))
        if self.interactive:
            self._draw_bar(step, line)
        else:
            print(f"step {self._step_str(step)} | {line}"[:MAX_COLUMNS], file=self.stream, flush=True)

    def table(self, title: str, values: Mapping[str, Any], step: int | None = None) -> None:
        """Prints ``values`` as an aligned two-column table under ``== title (step N) ==``."""
        if not self.enabled:
            return
        rows = table_lines([{"metric": str(k), "value": v} for k, v in values.items()], header=False)
        self.note("\n".join([f"== {title}" + (f" (step {step})" if step is not None else "") + " =="]
                             + [f"  {line}" for line in rows]))

    def end_bar(self) -> None:
        """Closes the bar (leaving its last state on screen) so that later output starts on a fresh line."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _eta(self, step: int, row: Mapping[str, Any], now: float) -> float | None:
        if ETA_KEY in row:
            return _finite(row[ETA_KEY])
        if self.total_steps is None or self._t0 is None:
            return None
        s0, t0 = self._t0
        if step <= s0 or now <= t0:
            return None
        return (self.total_steps - step) * (now - t0) / (step - s0)

    def _step_str(self, step: int) -> str:
        return f"{step}/{self.total_steps}" if self.total_steps is not None else str(step)

    def _draw_bar(self, step: int, fields: str) -> None:
        from tqdm import tqdm

        if self._bar is None:
            cols = min(shutil.get_terminal_size((MAX_COLUMNS, 24)).columns, MAX_COLUMNS)
            self._bar = tqdm(total=self.total_steps, initial=step, file=self.stream, ncols=cols, mininterval=0,
                             delay=0, leave=True, dynamic_ncols=False)
        # Braces in the format are tqdm's fields; ours carry none.
        self._bar.bar_format = "step {n_fmt}/{total_fmt} |{bar}| " + fields
        self._bar.n = step
        self._bar.refresh()
