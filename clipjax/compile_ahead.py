"""Compile-ahead plans: the real train step compiled for a target's devices; nothing runs.

A target names the devices to compile for:

* ``tpu:<topology>`` (``tpu:v5p:8x8x8``, ``tpu:v5e:16x16``, ``tpu:v6e:8x8``; any name
  libtpu accepts): the TPU compiler builds the step for a described pod on any
  machine, CPU-only included (``jax.experimental.topologies``; needs libtpu, the
  ``clipjax[tpu]`` extra). Memory, FLOPs and the time estimate are the TPU
  compiler's own.
* ``cpu:<N>``: N simulated CPU devices (``XLA_FLAGS`` is set before the CPU
  backend starts). CPU memory is an upper bound of an accelerator's (bf16 dots
  run in fp32, less fusion).

``plan(config, devices)`` returns one row: per-device arguments, temporaries and
peak memory against the device's HBM, whether it fits, the analytic model FLOPs,
the compiler's FLOPs and (TPU) its step-time estimate with the MFU that implies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
import time
from typing import Any, Sequence

from clipjax.errors import UserError

GIB = 1024**3

# HBM per device in GiB as the chips' spec sheets give it (Google Cloud TPU system
# architecture pages), keyed like ``mfu.PEAK_FLOPS`` by a substring of ``device_kind``.
# The TPU compiler reserves a little of it: its own limit (``compiler_hbm_bytes``)
# is 95.74 GiB on v5p, 15.75 on v5e, 31.25 on v6e (libtpu 0.0.42.1).
HBM_GIB: dict[str, float] = {
    "TPU v4": 32.0,  # per chip; libtpu's v4 topologies list each of its 2 cores (16 GiB) as a device
    "TPU v5 lite": 16.0,  # v5e
    "TPU v5e": 16.0,
    "TPU v5": 95.0,  # v5p
    "TPU v5p": 95.0,
    "TPU v6 lite": 32.0,  # v6e (Trillium)
    "TPU v6e": 32.0,
}


class TargetError(UserError, ValueError):
    """A target that cannot be compiled for here (bad name, no TPU compiler); one-line message."""


@dataclasses.dataclass(frozen=True)
class Target:
    """What to compile for: ``platform`` "tpu" with a libtpu ``topology`` name, or "cpu" with ``num_devices``."""

    platform: str
    topology: str = ""
    num_devices: int = 0

    def __str__(self) -> str:
        return f"tpu:{self.topology}" if self.platform == "tpu" else f"cpu:{self.num_devices}"


def parse_target(spec: str) -> Target:
    """``"tpu:v5p:8x8x8"`` or ``"cpu:64"`` -> Target; TargetError naming the fix otherwise."""
    platform, _, rest = spec.partition(":")
    if platform == "tpu" and rest:
        return Target("tpu", topology=rest)
    if platform == "cpu" and rest.isdigit() and int(rest) > 0:
        return Target("cpu", num_devices=int(rest))
    raise TargetError(f"--target={spec!r}: expected tpu:<topology> (e.g. tpu:v5p:4x4x4, tpu:v5e:16x16) "
                      f"or cpu:<number of simulated devices>")


@contextlib.contextmanager
def _quiet_stderr():
    """Drops what native code writes to fd 2 while the block runs."""
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def target_devices(target: Target) -> list:
    """The devices to compile for. CPU: call before the CPU backend starts (it reads XLA_FLAGS once)."""
    if target.platform == "cpu":
        from clipjax.host_env import simulated_cpu_devices

        return simulated_cpu_devices(target.num_devices)
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise TargetError("TPU compiler unavailable: libtpu is not installed (pip install 'clipjax[tpu]')")
    from jax.experimental import topologies

    # A described topology uses no chip, so the one-process-per-host libtpu lock
    # (/tmp/libtpu_lockfile) would only stop two plans from compiling side by side.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        # libtpu, loaded here for the first time, probes for a TPU VM and prints its misses
        # to stderr; they do not matter for a described topology.
        with _quiet_stderr():
            return list(topologies.get_topology_desc(platform="tpu", topology_name=target.topology).devices)
    except Exception as e:  # JaxRuntimeError for a bad name, RuntimeError when libtpu will not load
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TargetError(f"--target=tpu:{target.topology}: TPU compiler unavailable or topology invalid: {first}") \
            from None


def _lookup(table: dict[str, float], kind: str) -> float | None:
    low = kind.lower()
    for key in sorted(table, key=len, reverse=True):
        if key.lower() in low:
            return table[key]
    return None


def spec_hbm_bytes(device_kind: str) -> float | None:
    """HBM per device from ``HBM_GIB`` (spec sheets), or None for an unknown kind."""
    gib = _lookup(HBM_GIB, device_kind)
    return None if gib is None else gib * GIB


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}
_OOM = re.compile(r"(?:required for|Used)\s+.*?\(?([\d.]+)([KMGTP]?)i?B?\)?\s+(?:exceeds available HBM|of)\s+"
                  r"\(?([\d.]+)([KMGTP]?)i?B?\)?")


def _bytes(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse_out_of_memory(message: str) -> tuple[float, float] | None:
    """``(required, available)`` bytes from an XLA:TPU RESOURCE_EXHAUSTED message, or None."""
    m = _OOM.search(message)
    if m is None:
        return None
    return _bytes(m.group(1), m.group(2)), _bytes(m.group(3), m.group(4))


_CAPACITY_CACHE: dict[str, float | None] = {}


def compiler_hbm_bytes(device) -> float | None:
    """The HBM limit the TPU compiler enforces on ``device``, read off a program too big to fit.

    None when the compiler's message cannot be parsed (then the spec table stands).
    """
    key = device.device_kind
    if key in _CAPACITY_CACHE:
        return _CAPACITY_CACHE[key]
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    big = jax.ShapeDtypeStruct((2**14, 2**22), jnp.float32, sharding=SingleDeviceSharding(device))  # 256 GiB
    try:
        jax.jit(lambda x: jnp.sort(x, axis=0)).lower(big).compile()
        found = None
    except Exception as e:  # JaxRuntimeError RESOURCE_EXHAUSTED, the expected outcome
        hit = parse_out_of_memory(str(e))
        found = hit[1] if hit else None
    _CAPACITY_CACHE[key] = found
    return found


def hbm_bytes(devices: Sequence[Any], fallback_kind: str | None = None) -> tuple[float | None, str]:
    """``(HBM per device, source)``: the TPU compiler's own limit, else the spec table.

    ``fallback_kind`` (e.g. "TPU v5p") supplies the capacity for CPU targets.
    """
    device = devices[0]
    if device.platform == "tpu":
        found = compiler_hbm_bytes(device)
        if found:
            return found, "TPU compiler"
        return spec_hbm_bytes(device.device_kind), f"spec sheet {device.device_kind}"
    if fallback_kind:
        return spec_hbm_bytes(fallback_kind), f"spec sheet {fallback_kind}"
    return None, "unknown"


def _mesh_name(mesh) -> str:
    return " x ".join(f"{a} {mesh.shape[a]}" for a in mesh.axis_names if mesh.shape[a] > 1) or "1 device"


def validate_for(config, num_devices: int):
    """``config.validate`` for a compile on ``num_devices`` accelerators: no data needed, bf16 for dtype=auto."""
    from clipjax import config as config_lib

    if config.data.source == "arrayrecord" and not config.data.path:
        with config.unlocked():  # the compiled step never reads data: a plan needs no shards
            config.data.path = "(not needed to compile)"
    # Plans are for accelerators (simulated CPU devices stand in for them): model.dtype=auto is bf16.
    return config_lib.validate(config, num_devices, platform="tpu")


def plan(config, devices: Sequence[Any], *, peak_flops: float | None = None, assumed_mfu: float | None = None,
         capacity: tuple[float | None, str] | None = None, breakdown: bool = False) -> dict[str, Any]:
    """Compiles ``config``'s train step for ``devices`` (mesh and rules from the config) and returns one row.

    Peak memory = arguments + temporaries + outputs not aliased to the donated
    state. A TPU compile that runs out of HBM yields ``fits=False`` with the
    compiler's required figure as the peak. The projected step time is the TPU
    compiler's ``optimal_seconds`` with scanned loops counted every iteration
    (``hlo_flops.loop_factor``); on CPU it is the model FLOPs at ``peak_flops`` and
    ``assumed_mfu``. ``mfu`` = model FLOPs / (step time x peak). Compiler FLOPs
    are ``hlo_flops.compiled_flops`` (cost analysis, loops counted every iteration), so
    they include rematerialised work that model FLOPs leave out. ``breakdown`` (TPU)
    adds ``row["breakdown"]``: the step's seconds by category and the collectives' GiB by
    kind (``step_breakdown``).
    """
    from clipjax import hlo_flops
    from clipjax import mfu as mfu_lib
    from clipjax import sharding
    from clipjax.train_step import compile_train_step, make_setup

    validate_for(config, len(devices))
    mesh = sharding.mesh_from_config(config.mesh, devices)
    kind = devices[0].device_kind
    on_tpu = devices[0].platform == "tpu"
    if peak_flops is None:
        hit = mfu_lib.lookup_peak(kind)
        peak_flops = hit[0] if hit else float("nan")
    hbm, hbm_source = capacity or hbm_bytes(devices)
    model_flops = mfu_lib.clip_train_flops(config.model, config.train.batch_size) / len(devices)
    row: dict[str, Any] = {
        "model": config.model.size, "batch": config.train.batch_size, "devices": len(devices),
        "device": mfu_lib.device_name(kind), "mesh": _mesh_name(mesh), "loss": f"{config.loss.kind}/{config.loss.impl}",
        "remat": config.model.remat, "k": config.train.grad_accum,
    }
    t0 = time.perf_counter()
    try:
        compiled = compile_train_step(make_setup(config, mesh))
    except Exception as e:
        oom = parse_out_of_memory(str(e)) if "RESOURCE_EXHAUSTED" in str(e) else None
        if oom is None:
            raise
        row.update({"args_GiB": None, "temp_GiB": None, "peak_GiB": oom[0] / GIB, "hbm_GiB": oom[1] / GIB,
                    "fits": False, "model_TFLOP": model_flops / 1e12, "compiler_TFLOP": None, "step_s": None,
                    "mfu": None, "compile_s": time.perf_counter() - t0,
                    "note": "TPU compiler: out of HBM (peak is its required figure)"})
        return row
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    args_b, temp_b = mem.argument_size_in_bytes, mem.temp_size_in_bytes
    peak_b = args_b + temp_b + max(mem.output_size_in_bytes - mem.alias_size_in_bytes, 0)
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
    compiler_flops = hlo_flops.compiled_flops(compiled) or float("nan")
    note = None
    if on_tpu:
        optimal_s = float(cost.get("optimal_seconds", float("nan")))
        hlo_text = compiled.as_text()
        step_s = optimal_s * hlo_flops.loop_factor(hlo_text) if optimal_s > 0 else float("nan")
        if breakdown and optimal_s > 0:
            from clipjax import step_breakdown

            row["breakdown"] = {"seconds": step_breakdown.breakdown(hlo_text, step_s),
                                "collective_GiB": {k: v / GIB for k, v in
                                                   step_breakdown.collective_bytes(hlo_text).items()}}
        if not optimal_s > 0:
            note = f"the TPU compiler gave no step-time estimate (optimal_seconds={optimal_s:.4g})"
    else:
        step_s = model_flops / (peak_flops * assumed_mfu) if assumed_mfu else float("nan")
    row.update({
        "args_GiB": args_b / GIB, "temp_GiB": temp_b / GIB, "peak_GiB": peak_b / GIB,
        "hbm_GiB": hbm / GIB if hbm else None,
        "fits": bool(hbm is None or peak_b <= hbm),
        "model_TFLOP": model_flops / 1e12,
        "compiler_TFLOP": compiler_flops / 1e12 if math.isfinite(compiler_flops) else None,
        "step_s": step_s if math.isfinite(step_s) else None,
        "mfu": mfu_lib.mfu(model_flops, step_s, peak_flops) if math.isfinite(step_s) else None,
        "samples/s": config.train.batch_size / step_s if math.isfinite(step_s) and step_s > 0 else None,
        "compile_s": compile_s,
    })
    if hbm is None:
        note = f"HBM of {kind!r} unknown ({hbm_source}): fit not checked"
    if note:
        row["note"] = note
    return row


def print_plan(config, target_spec: str | None, prog: str) -> int:
    """Prints ``plan`` of ``config`` for ``--target=target_spec`` (default: this machine's devices) as a
    table; 1 with a one-line reason on stderr when it does not fit, else 0."""

    from clipjax.progress import format_cell, table_lines

    import jax

    target = parse_target(target_spec) if target_spec else None
    devices = target_devices(target) if target else jax.devices()
    row = plan(config, devices)
    print("\n".join(table_lines([{"target": str(target or devices[0].platform), **row}], fmt=format_cell)))
    if row["fits"]:
        return 0
    print(f"{prog}: does not fit: {row['mesh']} needs {row['peak_GiB']:.1f} GiB per device, "
          f"{row['device']} has {row['hbm_GiB']:.1f} GiB (try model.remat=full, train.grad_accum or a wider fsdp)",
          file=sys.stderr)
    return 1
