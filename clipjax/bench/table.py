"""Shared output for benchmark suites: an aligned text table or JSON lines."""

from __future__ import annotations

import json
import platform
import sys
import time
from typing import Any, Sequence


def cpu_model() -> str:
    """The host CPU as lscpu names it, with the vector extensions that decide XLA:CPU's kernels."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name} ({' '.join(isa)})" if isa else name


def environment() -> dict[str, Any]:
    """Where and when a figure was measured (recorded next to every result)."""
    import jax

    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.4e}"
    return str(v)


def emit(rows: Sequence[dict[str, Any]], as_json: bool = False, out=None) -> None:
    """Prints rows as a table (columns = union of keys, in first-seen order) or JSON to ``out``
    (default: ``sys.stdout`` as it is now, not as it was at import)."""
    out = out if out is not None else sys.stdout
    if as_json:
        json.dump({"environment": environment(), "rows": list(rows)}, out, indent=1)
        out.write("\n")
        return
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    out.write("  ".join(c.ljust(w) for c, w in zip(cols, widths)) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for row in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths)) + "\n")
