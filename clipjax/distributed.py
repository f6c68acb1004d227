"""Multi-host start-up: every host runs the same program; this joins them into one JAX runtime.

Order of precedence: explicit coordinator flags, then ``CLIPJAX_DISTRIBUTED=auto``
(JAX's own cluster detection, used on TPU pods), then SLURM, then multi-host TPU
environment variables. A single process with none of these runs on its local devices.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

import jax

log = logging.getLogger("clipjax")


def _is_multiprocess_env() -> str | None:
    """Names the multi-host environment this process runs in, if any.

    ``CLIPJAX_DISTRIBUTED=auto`` (set by launch/tpu_pod.sh) leaves the detection to
    ``jax.distributed.initialize()``, which reads Cloud TPU pod metadata itself.
    """
    if os.environ.get("CLIPJAX_DISTRIBUTED") == "auto":
        return "auto"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return "slurm"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, heartbeat_timeout_s: int = 60) -> None:
    """Calls ``jax.distributed.initialize`` when this is one process of several.

    CPU processes use gloo collectives. ``heartbeat_timeout_s`` bounds how long
    survivors wait when a peer dies before they exit with an error.
    """
    if jax.distributed.is_initialized():
        return
    explicit = coordinator is not None or (num_processes or 1) > 1
    env = None if explicit else _is_multiprocess_env()
    if not explicit and env is None:
        return
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if "cpu" in platforms.split(","):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if explicit:
        if coordinator is None or num_processes is None or process_id is None:
            raise ValueError("--coordinator, --num_processes and --process_id must be given together")
        kwargs = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    try:
        jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=heartbeat_timeout_s)
    except TypeError:  # older jax without heartbeat_timeout_seconds
        jax.distributed.initialize(**kwargs)
    log.info("process %d of %d (%s); %d local / %d global devices", jax.process_index(), jax.process_count(),
             "flags" if explicit else env, jax.local_device_count(), jax.device_count())


def is_multiprocess() -> bool:
    """True in one process of several (``jax.distributed`` is up)."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


def all_true(ok: bool) -> bool:
    """True only when ``ok`` holds on every process (a collective: every process must call it)."""
    if not is_multiprocess():
        return ok
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def barrier(name: str, *, timeout_s: int = 3600) -> None:
    """Blocks until every process reaches the barrier ``name`` (used once per run); a no-op alone.

    It waits in the coordination service, not in a collective. Gloo joins a device group on
    the group's first collective and gives the other processes 30 s to arrive, so a process
    that compiled or loaded faster must not start a new program's first step that far ahead.
    """
    if not is_multiprocess():
        return
    # jax has no public barrier that avoids a collective; orbax waits on this same client.
    coordination_state().client.wait_at_barrier(f"clipjax/{name}", timeout_in_ms=timeout_s * 1000)


def coordination_state():
    """``jax._src.distributed.global_state`` (client, preemption sync manager): no public API has them;
    setup.cfg bounds jax and tests/test_layers.py checks the attributes used."""
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state


def exit_at_once(status: int) -> NoReturn:
    """Ends this process with ``status`` now, without ``jax.distributed``'s shutdown barrier.

    After an error the other processes may be blocked in a collective that cannot finish;
    the cooperative shutdown would wait 5 minutes for them and keep the launch alive. Gone
    at once, this process is seen by the launcher (which stops the rest) or, on a pod, by
    the coordination service's heartbeat.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(status)
