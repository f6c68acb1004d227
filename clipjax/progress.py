"""Console output of a run: a progress line per logged step and aligned tables.

On a terminal the progress bar is redrawn in place; otherwise (log files, job
schedulers) each logged step prints one plain line::

    step 120/1000 | train/loss 3.2101 | train/lr 1.2e-04 | eta 0:02:11
"""

from __future__ import annotations

import math
import numbers
import shutil
import sys
from typing import Any, Mapping, TextIO

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


class Progress:
    """Prints logged steps and tables to ``stream`` (default: ``sys.stdout`` looked up at each write).

    ``interactive`` (default ``stream.isatty()``) redraws one progress bar in place.
    ``total_steps`` is shown as ``step N/total`` and used for the ETA.
    """

    def __init__(self, *, total_steps: int | None = None, interactive: bool | None = None,
                 stream: TextIO | None = None):
        self.total_steps = total_steps
        self._stream, self._interactive = stream, interactive
        self._bar_len = 0  # characters of the progress line currently on screen
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

    def step(self, step: int, row: Mapping[str, Any], now: float) -> None:
        """Shows the metrics ``row`` logged at ``step`` (``now``: perf_counter seconds)."""
        if self._t0 is None:
            self._t0 = (step, now)
        eta = self._eta(step, row, now)
        if self.interactive:
            self._draw_bar(step, row, eta)
            return
        parts = [f"step {self._step_str(step)}"]
        parts += [f"{k} {format_value(v)}" for k, v in row.items() if k not in ("step", ETA_KEY)]
        if eta is not None or self.total_steps is not None:
            parts.append(f"eta {format_eta(eta)}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def table(self, title: str, values: Mapping[str, Any], step: int | None = None) -> None:
        """Prints ``values`` as an aligned two-column table under ``== title (step N) ==``."""
        self.end_bar()
        width = max([len(str(k)) for k in values] + [len("metric")])
        lines = [f"== {title}" + (f" (step {step})" if step is not None else "") + " =="]
        lines += [f"  {str(k):<{width}}  {format_value(v)}" for k, v in values.items()]
        print("\n".join(lines), file=self.stream, flush=True)

    def end_bar(self) -> None:
        """Moves past the in-place progress line so that later output starts on a fresh line."""
        if self._bar_len:
            self.stream.write("\n")
            self.stream.flush()
            self._bar_len = 0

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
