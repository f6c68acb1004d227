"""Metric logging: ``metrics.jsonl``, TensorBoard event files and stdout progress.

``MetricWriter(workdir, enabled=jax.process_index() == 0, total_steps=N)``
writes three views of the same numbers, from process 0 only:

* ``WORKDIR/metrics.jsonl``: one JSON object per line, ``{"step": 120,
  "train/loss": 3.21, ...}`` with flat keys. Integers stay integers, every other
  value becomes a Python float; **non-finite values (NaN, +-inf) are written as
  ``null``**, since JSON has no NaN. ``write_summary`` lines also carry
  ``"summary": title``.
* TensorBoard event files in ``WORKDIR`` (tensorboardX), one scalar per key
  (non-finite values are left out there).
* stdout: on a terminal a progress bar redrawn in place; otherwise (log files,
  job schedulers) one plain line per write::

      step 120/1000 | train/loss 3.2101 | train/lr 1.2e-04 | eta 0:02:11

Resuming: a run killed after its last checkpoint may have logged later steps.
``truncate_after(resume_step)`` rewrites ``metrics.jsonl`` atomically without
them and makes TensorBoard discard its later events (``purge_step``).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Iterable, Mapping, TextIO

import numpy as np

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
ETA_KEY = "train/eta_sec"  # when the caller provides it, it is shown as "eta" rather than estimated
LOSS_KEY = "train/loss"
THROUGHPUT_KEY = "train/samples_per_sec"


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


def to_json_value(value: Any) -> int | float | str | None:
    """A scalar (Python, numpy or jax) as a JSON-safe Python value; non-finite -> None."""
    if isinstance(value, str) or value is None:
        return value
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (numbers.Integral, np.integer)):
        return int(value)
    arr = np.asarray(value)
    if arr.size != 1:
        raise TypeError(f"metric values must be scalars; got shape {arr.shape}")
    if arr.dtype.kind in "iu":
        return int(arr.reshape(()))
    if arr.dtype.kind == "b":
        return int(bool(arr.reshape(())))
    v = float(arr.reshape(()))
    return v if math.isfinite(v) else None


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


class MetricWriter:
    """Writes metrics to ``metrics.jsonl``, TensorBoard and stdout; a no-op when not ``enabled``.

    Args:
      workdir: run directory (created if missing).
      enabled: pass ``jax.process_index() == 0``; other processes write nothing.
      total_steps: shown as ``step N/total`` and used for the ETA.
      interactive: progress bar redrawn in place; default ``sys.stdout.isatty()``.
      flush_secs: TensorBoard flush period (it is also flushed on ``close``).
      stream: where progress goes; default ``sys.stdout`` looked up at each write.
    """

    def __init__(self, workdir: str, *, enabled: bool = True, total_steps: int | None = None,
                 interactive: bool | None = None, flush_secs: float = 30.0, stream: TextIO | None = None):
        self.workdir = workdir
        self.enabled = enabled
        self.total_steps = total_steps
        self._stream = stream
        self._interactive = interactive
        self._flush_secs = flush_secs
        self._file: TextIO | None = None
        self._tb = None
        self._purge_step: int | None = None
        self._closed = False
        self._bar_len = 0  # characters of the progress line currently on screen
        self._t0: tuple[int, float] | None = None  # (first step, time) for the ETA estimate
        self.last_step: int | None = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)

    # -- paths and lazily opened sinks --

    @property
    def path(self) -> str:
        return os.path.join(self.workdir, METRICS_FILE)

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    @property
    def interactive(self) -> bool:
        if self._interactive is not None:
            return self._interactive
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def _jsonl(self) -> TextIO:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        return self._file

    def _tensorboard(self):
        if self._tb is None:
            from tensorboardX import SummaryWriter

            kwargs = {"logdir": self.workdir, "flush_secs": max(int(self._flush_secs), 1)}
            if self._purge_step is not None:
                kwargs["purge_step"] = self._purge_step
            self._tb = SummaryWriter(**kwargs)
        return self._tb

    # -- public API --

    def truncate_after(self, step: int) -> int:
        """Drops ``metrics.jsonl`` lines with ``step > step`` (rewriting the file atomically).

        Call when resuming from the checkpoint at ``step``, before writing.
        Lines without a step are kept; unparseable lines are dropped.
        TensorBoard events after ``step`` are purged when its writer opens.
        Returns the number of lines dropped.
        """
        if not self.enabled:
            return 0
        self._purge_step = int(step) + 1
        if self._file is not None:
            self._file.close()
            self._file = None
        if not os.path.exists(self.path):
            return 0
        kept, dropped = [], 0
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    dropped += 1
                    continue
                s = row.get("step") if isinstance(row, dict) else None
                if isinstance(s, (int, float)) and s > step:
                    dropped += 1
                    continue
                kept.append(line if line.endswith("\n") else line + "\n")
        if dropped:
            fd, tmp = tempfile.mkstemp(prefix=".metrics.", suffix=".tmp", dir=self.workdir)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.writelines(kept)
                    f.flush()
                    os.fsync(f.fileno())
                shutil.copymode(self.path, tmp)
                os.replace(tmp, self.path)
            except BaseException:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise
            log.info("%s: dropped %d lines after step %d", self.path, dropped, step)
        return dropped

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Logs scalar ``metrics`` at ``step`` to all three sinks."""
        if not self.enabled:
            return
        step = int(step)
        row = {"step": step}
        for key, value in metrics.items():
            if key == "step":
                raise ValueError("'step' is reserved; pass it as the step argument")
            row[str(key)] = to_json_value(value)
        self._append(row)
        tb = self._tensorboard()
        for key, value in row.items():
            # Non-finite values are left out (tensorboardX prints a warning for each one).
            if key != "step" and value is not None and not isinstance(value, str):
                tb.add_scalar(key, float(value), step)
        now = time.perf_counter()
        if self._t0 is None:
            self._t0 = (step, now)
        self.last_step = step
        self._print(step, row, now)

    def write_summary(self, title: str, values: Mapping[str, Any], step: int | None = None) -> None:
        """Prints ``values`` as an aligned two-column table and records it in ``metrics.jsonl``.

        The line is ``{"step": step, "summary": title, key: value, ...}`` with
        ``step`` defaulting to the last step written (or null).
        """
        if not self.enabled:
            return
        step = self.last_step if step is None else int(step)
        row: dict[str, Any] = {"step": step, "summary": title}
        row.update({str(k): to_json_value(v) for k, v in values.items()})
        self._append(row)
        self._end_bar()
        width = max([len(str(k)) for k in values] + [len("metric")])
        lines = [f"== {title}" + (f" (step {step})" if step is not None else "") + " =="]
        lines += [f"  {str(k):<{width}}  {format_value(row[str(k)])}" for k in values]
        print("\n".join(lines), file=self.stream, flush=True)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes everything; safe to call more than once."""
        if self._closed or not self.enabled:
            self._closed = True
            return
        self._closed = True
        self._end_bar()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals --

    def _append(self, row: dict[str, Any]) -> None:
        f = self._jsonl()
        f.write(json.dumps(row, allow_nan=False) + "\n")
        f.flush()

    def _eta(self, step: int, row: Mapping[str, Any], now: float) -> float | None:
        if ETA_KEY in row:
            return row[ETA_KEY]
        if self.total_steps is None or self._t0 is None:
            return None
        s0, t0 = self._t0
        if step <= s0 or now <= t0:
            return None
        return (self.total_steps - step) * (now - t0) / (step - s0)

    def _step_str(self, step: int) -> str:
        return f"{step}/{self.total_steps}" if self.total_steps is not None else str(step)

    def _print(self, step: int, row: Mapping[str, Any], now: float) -> None:
        eta = self._eta(step, row, now)
        if self.interactive:
            self._draw_bar(step, row, eta)
            return
        parts = [f"step {self._step_str(step)}"]
        parts += [f"{k} {format_value(v)}" for k, v in row.items() if k not in ("step", ETA_KEY)]
        if eta is not None or self.total_steps is not None:
            parts.append(f"eta {format_eta(eta)}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def _draw_bar(self, step: int, row: Mapping[str, Any], eta: float | None) -> None:
        parts = []
        if self.total_steps:
            frac = min(max(step / self.total_steps, 0.0), 1.0)
            filled = int(round(20 * frac))
            parts.append(f"[{'#' * filled}{'.' * (20 - filled)}] {self._step_str(step)}")
        else:
            parts.append(f"step {step}")
        loss = row.get(LOSS_KEY, next((v for k, v in row.items() if k.endswith("loss")), None))
        parts.append(f"loss {format_value(loss)}")
        if THROUGHPUT_KEY in row:
            parts.append(f"{format_value(row[THROUGHPUT_KEY])} samples/s")
        parts.append(f"eta {format_eta(eta)}")
        text = " | ".join(parts)
        cols = shutil.get_terminal_size((120, 24)).columns
        text = text[: max(cols - 1, 20)]
        pad = max(self._bar_len - len(text), 0)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._bar_len = len(text)

    def _end_bar(self) -> None:
        """Moves past the in-place progress line so that later output starts on a fresh line."""
        if self._bar_len:
            self.stream.write("\n")
            self.stream.flush()
            self._bar_len = 0


def iter_series(rows: Iterable[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` over non-summary rows; null values become NaN."""
    steps, values = [], []
    for row in rows:
        if "summary" in row or key not in row or row.get("step") is None:
            continue
        v = row[key]
        if isinstance(v, str):
            continue
        steps.append(int(row["step"]))
        values.append(float("nan") if v is None else float(v))
    return steps, values
