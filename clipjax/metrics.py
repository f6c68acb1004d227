"""Metric logging: ``metrics.jsonl`` and TensorBoard event files, with console progress.

``MetricWriter(workdir, enabled=jax.process_index() == 0, total_steps=N)``
writes the same numbers to three places, from process 0 only:

* ``WORKDIR/metrics.jsonl``: one JSON object per line, ``{"step": 120,
  "train/loss": 3.21, ...}`` with flat keys. Integers stay integers, every other
  value becomes a Python float; **non-finite values (NaN, +-inf) are written as
  ``null``**, since JSON has no NaN. ``report.read_metrics`` reads it back.
* TensorBoard event files in ``WORKDIR`` (tensorboardX), one scalar per key
  (non-finite values are left out there).
* the console, through ``progress.Progress``.

Resuming: a run killed after its last checkpoint may have logged later steps.
``truncate_after(resume_step)`` rewrites ``metrics.jsonl`` atomically without
them and makes TensorBoard discard its later events (``purge_step``). The lines
it drops are first appended to ``metrics.dropped.jsonl``: history is never lost.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import time
from typing import Any, Mapping, TextIO

import numpy as np

from clipjax.atomic import atomic_path
from clipjax.errors import UserError
from clipjax.progress import Progress

log = logging.getLogger("clipjax")

METRICS_FILE = "metrics.jsonl"
DROPPED_FILE = "metrics.dropped.jsonl"


class MetricsWriteError(UserError, OSError):
    """``metrics.jsonl`` cannot be rewritten (disk full, permissions)."""


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


class MetricWriter:
    """Writes metrics to ``metrics.jsonl``, TensorBoard and stdout; a no-op when not ``enabled``.

    Args:
      workdir: run directory (created if missing).
      enabled: pass ``jax.process_index() == 0``; other processes write nothing.
      total_steps, interactive, stream: passed to ``progress.Progress``.
      flush_secs: TensorBoard flush period (it is also flushed on ``close``).
    """

    def __init__(self, workdir: str, *, enabled: bool = True, total_steps: int | None = None,
                 interactive: bool | None = None, flush_secs: float = 30.0, stream: TextIO | None = None):
        self.workdir = workdir
        self.enabled = enabled
        self.progress = Progress(total_steps=total_steps, interactive=interactive, stream=stream, enabled=enabled)
        self._flush_secs = flush_secs
        self._file: TextIO | None = None
        self._tb = None
        self._purge_step: int | None = None
        self._closed = False
        if enabled:
            os.makedirs(workdir, exist_ok=True)

    # -- paths and lazily opened sinks --

    @property
    def path(self) -> str:
        return os.path.join(self.workdir, METRICS_FILE)

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
        Lines without a step are kept; unparseable lines are dropped. Every dropped
        line is first appended to ``metrics.dropped.jsonl``. TensorBoard events after
        ``step`` are purged when its writer opens. Returns the number of lines dropped.
        """
        if not self.enabled:
            return 0
        self._purge_step = int(step) + 1
        if self._file is not None:
            self._file.close()
            self._file = None
        try:
            return self._drop_after(step)
        except OSError as e:
            raise MetricsWriteError(f"cannot rewrite {self.path} for the resume from step {step}: "
                                    f"{e.strerror or e}; free space or fix permissions in {self.workdir} "
                                    "and rerun (nothing was changed)") from None

    def _drop_after(self, step: int) -> int:
        if not os.path.exists(self.path):
            return 0
        kept, dropped = [], []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                line = line if line.endswith("\n") else line + "\n"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    dropped.append(line)
                    continue
                s = row.get("step") if isinstance(row, dict) else None
                (dropped if isinstance(s, (int, float)) and s > step else kept).append(line)
        if dropped:
            # The backup first: a crash between the two writes then loses nothing.
            with open(os.path.join(self.workdir, DROPPED_FILE), "a", encoding="utf-8") as f:
                f.writelines(dropped)
                f.flush()
                os.fsync(f.fileno())
            with atomic_path(self.path) as tmp, open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            log.info("%s: moved %d lines after step %d to %s", self.path, len(dropped), step, DROPPED_FILE)
        return len(dropped)

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
        self.progress.step(step, row, time.perf_counter())

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
        self.progress.end_bar()
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
