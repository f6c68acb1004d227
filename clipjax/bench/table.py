"""Shared output for benchmark suites: an aligned text table or JSON lines."""

from __future__ import annotations

import json
import platform
import sys
import time
from typing import Any, Sequence

from clipjax.progress import format_cell, table_lines


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

    from clipjax import mfu

    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "device_kind": mfu.device_name(jax.devices()[0].device_kind),
    }


def emit(rows: Sequence[dict[str, Any]], as_json: bool = False, out=None) -> None:
    """Prints rows as a table (columns = union of keys, in first-seen order) or JSON to ``out``
    (default: ``sys.stdout`` as it is now, not as it was at import)."""
    out = out if out is not None else sys.stdout
    if as_json:
        json.dump({"environment": environment(), "rows": list(rows)}, out, indent=1)
        out.write("\n")
        return
    for line in table_lines(rows, fmt=format_cell):
        out.write(line + "\n")
