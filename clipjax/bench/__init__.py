"""Benchmarks users can run: `clipjax-bench loss|data|compile|train`."""

from __future__ import annotations

import os


def simulated_cpu_devices(n: int) -> list:
    """``n`` simulated CPU devices; must run before anything imports jax."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if jax.device_count() < n:
        raise SystemExit(f"only {jax.device_count()} of {n} devices: was jax imported before XLA_FLAGS was set?")
    return jax.devices()[:n]
