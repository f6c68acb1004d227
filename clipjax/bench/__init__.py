"""Benchmarks users can run: `clipjax-bench loss|data|compile|train|patches ...`."""

from __future__ import annotations

import os


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
