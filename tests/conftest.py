"""Test set-up: 8 simulated CPU devices, strict rank promotion, one compilation cache per run."""

import atexit
import os
import shutil
import signal
import tempfile

# Must be set before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Most of the suite's time is XLA compiling the same small train steps again, in one
# subprocess run after another (a restarted run compiles what the killed one did). One
# persistent compilation cache per test run, shared by pytest-xdist's workers (they inherit
# the environment of the process that made it) and every subprocess, compiles each
# program once. A fresh folder per run: no test depends on a previous run's state.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="clipjax-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# A shell starts background jobs with Ctrl-C ignored, and children inherit that: the
# Ctrl-C tests' subprocesses would then never see it. Caught here, it is default there.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def fresh_compiles():
    """XLA compiles every program in this test: what the compiler prints is then seen."""
    from jax.experimental.compilation_cache import compilation_cache

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


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


def pytest_configure(config):
    # pytest-xdist hands each worker a quarter of its share up front, in collection order:
    # with the slow cases first, one worker would get them all. One test at a time instead.
    if getattr(config.option, "maxschedchunk", 0) is None:
        config.option.maxschedchunk = 1


def pytest_collection_modifyitems(config, items):
    """Slow cases first: under pytest-xdist they then overlap the many short ones instead of
    running alone at the end of the suite."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
