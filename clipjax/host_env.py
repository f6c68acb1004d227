"""Host memory settings on the CPU: glibc's heap kept for XLA's temporaries, in-process.

XLA:CPU gives every execution one fresh allocation for all of its temporaries (~2 GiB
for a ViT-B/32 train step at batch 32). glibc maps any allocation above its mmap
threshold (at most 32 MiB) anew and unmaps it on free, so the kernel faults the whole
buffer in again every step, 4 KiB at a time: ~550k page faults and ~1.4 s of kernel
time a step on 2 cores.

**Heap reuse** (:func:`reuse_heap`; on by default when JAX runs on the CPU): glibc's
``mallopt(M_MMAP_MAX, 0)`` (large blocks come from the heap, not from fresh mappings) and
``mallopt(M_TRIM_THRESHOLD, -1)`` (the freed heap top is kept), set in the running
process; they are the same parameters as the ``glibc.malloc.mmap_max`` and
``trim_threshold`` tunables, which a process only reads at its start. With
``jax_cpu_enable_async_dispatch`` off a single-device program runs, and allocates, on
the calling thread: glibc's per-thread arenas map anything over 64 MiB whatever these
settings say (``sysmalloc`` falls back to ``mmap`` when a thread heap cannot grow), only
the main arena obeys them. Dispatch is fixed when JAX creates its CPU client, so
:func:`reuse_heap` must run before JAX's first computation: importing
``clipjax.train_step`` calls it, and so do the command-line tools. The buffer is then
faulted in once per process: the B/32 step above went from 13.9 s to 10.1 s. The memory
stays with the process for its lifetime, which a training process needs every step
anyway. ``CLIPJAX_HEAP_REUSE=0`` turns it off.

**Huge pages** (``CLIPJAX_HUGE_PAGES=1``, off by default): ``glibc.malloc.hugetlb=1``
(glibc >= 2.35, transparent huge pages on) backs large blocks with 2 MiB pages. That
saved ~1.5% of a step on a freshly booted VM; on one that had run for hours the kernel
spent 11-13 s a step compacting memory for them. ``mallopt`` has no such parameter: the
tools re-execute once with the tunable (:func:`configure`).

**The CPU as the config's devices** (when JAX will run on the CPU): ``JAX_PLATFORMS=cpu``,
so JAX never loads libtpu (installed with the ``test`` and ``tpu`` extras), which would
otherwise print its TPU probes on every command; and, when the command's config asks for
a mesh of several devices and ``XLA_FLAGS`` names no device count,
``--xla_force_host_platform_device_count`` with the count the mesh needs
(:func:`cpu_device_count`), so ``clipjax-train --config=configs/demo.py`` runs on the 8
simulated devices its ``data=4 x fsdp=2`` mesh names, as ``make demo`` does.

Tunables and device flags are read when a process starts, hence the re-execution. What was added is
recorded in the environment, so that a comparison's other side (the OpenCLIP worker of
``clipjax-bench train``) runs in the environment the user gave.
"""

from __future__ import annotations

import ctypes
import glob
import json
import logging
import math
import os
import sys
from typing import Callable, Sequence

log = logging.getLogger("clipjax")

# mallopt parameters (glibc's malloc.h) and the values heap reuse gives them.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
HEAP_REUSE_MALLOPT = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # -1: never trim (mallopt(3); its value is a C int)
HEAP_REUSE_TUNABLES = ("glibc.malloc.mmap_max", "glibc.malloc.trim_threshold")  # the same two as tunables
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
ACCELERATOR_DEVICES = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")  # TPU, GPU
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
MAX_FILLED_DEVICES = 8  # a mesh axis of -1 fills at most this many simulated devices (at most one per core)
ADDED_MARK = "CLIPJAX_HOST_ENV_ADDED"  # JSON {variable: the user's value or null}, set by the re-execution


def _glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = (int(v) for v in version.split(".")[:2])
    except (ValueError, OSError, AttributeError):
        return None
    return (major, minor) if name == "glibc" else None


def _thp_available() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def jax_runs_on_cpu(env: dict[str, str]) -> bool:
    """Whether JAX will run on the CPU: ``JAX_PLATFORMS`` says so, or the host has no TPU or GPU device."""
    platforms = env.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICES)


def cpu_device_count(mesh_sizes: Sequence[int], batch_size: int, cores: int) -> int:
    """Simulated CPU devices for a mesh of ``mesh_sizes`` (data, fsdp, tensor; -1 fills): the fixed
    axes' product, or with an axis to fill the most devices up to ``min(cores, MAX_FILLED_DEVICES)``
    over which the global batch still divides."""
    fixed = math.prod(s for s in mesh_sizes if s > 0)
    if all(s > 0 for s in mesh_sizes):
        return fixed
    tensor = mesh_sizes[-1] if mesh_sizes[-1] > 0 else 1
    for n in range(max(fixed, min(cores, MAX_FILLED_DEVICES)), fixed - 1, -1):
        if n % fixed == 0 and batch_size % (n // tensor) == 0:
            return n
    return fixed


def settings(env: dict[str, str], cpu_devices: Callable[[], int | None] | None = None) -> dict[str, str]:
    """The variables the re-execution sets (new values), given the environment the user gave.

    ``cpu_devices()``: the simulated CPU devices the command's config needs (None: JAX's default).
    """
    out = {}
    on_cpu = jax_runs_on_cpu(env)
    if on_cpu and not env.get("JAX_PLATFORMS"):
        out["JAX_PLATFORMS"] = "cpu"
    xla_flags = env.get("XLA_FLAGS", "")
    if on_cpu and cpu_devices is not None and DEVICE_COUNT_FLAG not in xla_flags:
        n = cpu_devices()
        if n is not None and n > 1:
            out["XLA_FLAGS"] = f"{xla_flags} {DEVICE_COUNT_FLAG}={n}".strip()
    if not sys.platform.startswith("linux") or _glibc_version() is None:
        return out
    user_tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    user_keys = {t.split("=")[0] for t in user_tunables}
    tunables = []
    if env.get("CLIPJAX_HUGE_PAGES", "0") == "1" and _glibc_version() >= (2, 35) and _thp_available():
        tunables.append(HUGE_PAGES_TUNABLE)
    tunables = [t for t in tunables if t.split("=")[0] not in user_keys]  # the user's own values win
    if tunables:
        out["GLIBC_TUNABLES"] = ":".join(user_tunables + tunables)
    return out


_HEAP_REUSED: list[bool] = []  # the outcome of this process's first reuse_heap() call


def reuse_heap(env: dict[str, str] | None = None) -> bool:
    """Keeps XLA:CPU's per-step temporaries on glibc's heap in this process (module docstring).

    Applies when JAX will run on the CPU under glibc and ``CLIPJAX_HEAP_REUSE`` is not
    ``0``; returns whether it did. Call it before JAX's first computation (importing
    ``clipjax.train_step`` does): later, JAX's CPU client dispatches asynchronously and
    only the ``mallopt`` half takes effect, which a warning says. Repeated calls do nothing.
    """
    if _HEAP_REUSED:
        return _HEAP_REUSED[0]
    env = dict(os.environ) if env is None else env
    applies = (sys.platform.startswith("linux") and _glibc_version() is not None
               and env.get("CLIPJAX_HEAP_REUSE", "1") != "0" and jax_runs_on_cpu(env))
    _HEAP_REUSED.append(applies)
    if not applies:
        return False
    libc = ctypes.CDLL(None)
    user_keys = {t.split("=")[0] for t in env.get("GLIBC_TUNABLES", "").split(":")}
    for (param, value), key in zip(HEAP_REUSE_MALLOPT, HEAP_REUSE_TUNABLES):
        if key not in user_keys:  # the user's own tunables win
            libc.mallopt(param, value)
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        if jax.config.read("jax_cpu_enable_async_dispatch"):
            log.warning("heap reuse: JAX's CPU client already dispatches asynchronously, so temporaries over "
                        "64 MiB still get fresh mappings; import clipjax.train_step (or call "
                        "clipjax.host_env.reuse_heap()) before JAX's first computation")
    else:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


def configure(cpu_devices: Callable[[], int | None] | None = None) -> None:
    """The command-line tools' settings: re-executes once for :func:`settings` (if any), then :func:`reuse_heap`.

    Call it first thing in a command-line entry point (nothing else runs twice), before
    JAX starts its backends.
    """
    added = {} if ADDED_MARK in os.environ else settings(dict(os.environ), cpu_devices)
    if added:
        env = dict(os.environ, **added, **{ADDED_MARK: json.dumps({k: os.environ.get(k) for k in added})})
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)
    reuse_heap()


def without_added(env: dict[str, str]) -> dict[str, str]:
    """``env`` as the user gave it: what :func:`configure` added taken out again."""
    if ADDED_MARK not in env:
        return env
    originals = json.loads(env[ADDED_MARK])
    env = {k: v for k, v in env.items() if k != ADDED_MARK and k not in originals}
    env.update({k: v for k, v in originals.items() if v is not None})
    return env


# Simulated CPU devices (benchmarks, compile-ahead plans): XLA_FLAGS, read once when jax's CPU backend starts.
def request_cpu_devices(n: int) -> None:
    """Asks XLA for ``n`` simulated CPU devices; takes effect only before jax starts its backends."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()


def cpu_devices(n: int) -> list:
    """The first ``n`` CPU devices, or a one-line exit when fewer were simulated."""
    import jax

    if jax.device_count() < n:
        raise SystemExit(f"only {jax.device_count()} of {n} devices: was jax started before XLA_FLAGS was set?")
    return jax.devices()[:n]


def simulated_cpu_devices(n: int) -> list:
    """``n`` simulated CPU devices (the CPU backend even where an accelerator is present)."""
    request_cpu_devices(n)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return cpu_devices(n)
