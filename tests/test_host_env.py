"""Host memory settings: heap reuse in-process (tools and library users alike), page faults actually fewer."""

import os
import subprocess
import sys

import pytest

from clipjax import host_env

# A jitted program whose temporaries (a 6000 x 6000 float32 product, 144 MB) exceed any mmap
# threshold, run 30 times after SETUP (a tool's entry point, or a library user's import);
# prints GLIBC_TUNABLES and the page faults of each call.
TOOL_SETUP = "from clipjax import host_env; host_env.configure()"
LIBRARY_SETUP = "import clipjax.train_step"
XLA_CHILD = """
import os, resource
SETUP
import jax, jax.numpy as jnp
x = jnp.ones((6000, 64), jnp.float32)
f = jax.jit(lambda x: (jnp.sin(x @ x.T) @ x).sum())
faults = []
for _ in range(30):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(os.environ.get("GLIBC_TUNABLES"), *faults)
"""

# Writes 256 MiB from glibc's malloc (not numpy, which asks for huge pages itself) after the entry
# point's call; prints the tunables and the page faults.
MALLOC_CHILD = """
import ctypes, os, resource
from clipjax import host_env
host_env.configure()
n = 256 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
ctypes.memset(libc.malloc(n), 1, n)
print(os.environ.get("GLIBC_TUNABLES"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

linux_glibc = pytest.mark.skipif(not (sys.platform.startswith("linux") and host_env._glibc_version()),
                                 reason="glibc's tunables: Linux with glibc only")


def _child(code: str, setup: str = TOOL_SETUP, **env) -> list[str]:
    env = {k: v for k, v in {**os.environ, "JAX_PLATFORMS": "cpu", **env}.items() if v is not None}
    env.pop(host_env.ADDED_MARK, None)
    return subprocess.run([sys.executable, "-c", code.replace("SETUP", setup)], env=env, capture_output=True, text=True,
                          check=True).stdout.split()


@linux_glibc
def test_xla_temporaries_are_faulted_in_once_on_cpu_in_process():
    tool_tunables, *tool_faults = _child(XLA_CHILD, TOOL_SETUP, GLIBC_TUNABLES=None)
    lib_tunables, *lib_faults = _child(XLA_CHILD, LIBRARY_SETUP, GLIBC_TUNABLES=None)
    off_tunables, *off_faults = _child(XLA_CHILD, LIBRARY_SETUP, CLIPJAX_HEAP_REUSE="0", GLIBC_TUNABLES=None)
    # mallopt in the running process: no re-execution, no tunables.
    assert tool_tunables == lib_tunables == off_tunables == "None"
    # 144 MB in 4 KiB pages is ~35,000 faults: every call without the setting. With it, the
    # first call and a few more until the heap's layout settles (a small allocation landing in
    # the freed block makes the heap grow once more): 2-5 of 30 calls, with 1 and 8 devices.
    assert min(int(f) for f in off_faults) > 30_000
    for faults in (tool_faults, lib_faults):
        faulting = [i for i, f in enumerate(faults) if int(f) > 1_000]
        assert faulting[:1] == [0] and len(faulting) <= 10, faults


@linux_glibc
@pytest.mark.skipif(not (host_env._glibc_version() >= (2, 35) and host_env._thp_available()),
                    reason="needs glibc >= 2.35 and transparent huge pages (the setting does nothing elsewhere)")
def test_large_buffers_go_on_huge_pages_when_asked():
    tunables, faults = _child(MALLOC_CHILD, CLIPJAX_HUGE_PAGES="1", CLIPJAX_HEAP_REUSE="0", GLIBC_TUNABLES=None)
    off_tunables, off_faults = _child(MALLOC_CHILD, CLIPJAX_HEAP_REUSE="0", GLIBC_TUNABLES=None)
    assert tunables == host_env.HUGE_PAGES_TUNABLE and off_tunables == "None"
    # 256 MiB in 4 KiB pages is 65,536 faults; in 2 MiB pages, about 128.
    assert int(off_faults) > 60_000 and int(faults) < int(off_faults) / 10


def test_only_huge_pages_need_a_re_execution_and_the_users_own_tunables_win():
    cpu = {"JAX_PLATFORMS": "cpu"}
    assert host_env.settings(cpu) == {}  # heap reuse is mallopt in-process
    if not (sys.platform.startswith("linux") and host_env._glibc_version() >= (2, 35) and host_env._thp_available()):
        return
    huge = {**cpu, "CLIPJAX_HUGE_PAGES": "1"}
    assert host_env.settings(huge) == {"GLIBC_TUNABLES": host_env.HUGE_PAGES_TUNABLE}
    own = {**huge, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.mmap_max=5"}
    assert host_env.settings(own) == {}


def test_the_comparison_side_gets_the_users_environment_back():
    user = {"GLIBC_TUNABLES": "glibc.malloc.check=0", "A": "1"}
    added = dict(user, GLIBC_TUNABLES="glibc.malloc.check=0:glibc.malloc.mmap_max=0",
                 **{host_env.ADDED_MARK: '{"GLIBC_TUNABLES": "glibc.malloc.check=0"}'})
    assert host_env.without_added(added) == user
    none_before = {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.mmap_max=0",
                   host_env.ADDED_MARK: '{"GLIBC_TUNABLES": null}'}
    assert host_env.without_added(none_before) == {"A": "1"}
    assert host_env.without_added(user) == user


# The entry points' start: re-executed with the CPU set up for the command line's config, then one computation.
DEVICES_CHILD = """
import sys
from clipjax import host_env, main
host_env.configure(lambda: main._cpu_devices(sys.argv[1:]))
import jax
jax.numpy.ones(4).sum().block_until_ready()
print(jax.default_backend(), jax.device_count())
"""


@pytest.mark.parametrize("config, devices", [("configs/demo.py:smoke", 8), ("configs/demo.py:smoke --config.mesh.fsdp=1", 4)])
def test_a_cpu_command_runs_on_the_devices_its_mesh_names_and_hears_nothing_of_libtpu(config, devices):
    """No XLA_FLAGS, no JAX_PLATFORMS (a fresh shell): the demo's data=4 x fsdp=2 mesh gets 8 simulated
    devices, and libtpu (installed with the test extra) prints none of its TPU probes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", host_env.ADDED_MARK)}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    spec, *overrides = config.split()
    proc = subprocess.run([sys.executable, "-c", DEVICES_CHILD, f"--config={spec}", *overrides, "--workdir=w"],
                          env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["cpu", str(devices)]
    assert proc.stderr == "", proc.stderr


def test_a_mesh_axis_to_fill_takes_a_device_a_core_where_the_batch_divides():
    assert host_env.cpu_device_count([4, 2, 1], 128, cores=2) == 8  # fixed axes: what they name
    assert host_env.cpu_device_count([-1, 1, 1], 64, cores=16) == 8  # at most MAX_FILLED_DEVICES
    assert host_env.cpu_device_count([-1, 1, 1], 64, cores=6) == 4  # 6 and 5 do not divide 64
    assert host_env.cpu_device_count([-1, 2, 1], 48, cores=2) == 2
    assert host_env.cpu_device_count([-1, 1, 2], 6, cores=8) == 6  # 3 batch shards x tensor 2
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
    assert "XLA_FLAGS" not in host_env.settings(env, lambda: 8)  # the user's own count wins
    assert host_env.settings({"JAX_PLATFORMS": "cuda"}, lambda: 8) == {}
