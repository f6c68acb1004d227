"""Test set-up: 8 simulated CPU devices, strict rank promotion, float64 on demand."""

import os

# Must be set before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, f"expected 8 simulated devices, got {len(devs)}"
    return devs


@pytest.fixture(scope="session")
def bpe_path():
    """Path to the CLIP BPE vocabulary fetched by `make test` (from the open-clip-torch wheel)."""
    path = os.environ.get("CLIPJAX_BPE_PATH", os.path.join(os.path.dirname(__file__), "..", ".cache", "bpe_simple_vocab_16e6.txt.gz"))
    if not os.path.exists(path):
        pytest.fail(f"CLIP BPE vocabulary not found at {path}; run `make bpe` (make test does it)")
    return path
