"""The command-line tools' opt-in huge-page setting: re-executed once with the tunable, faults actually fewer."""

import os
import subprocess
import sys

import pytest

from clipjax import host_env

# Writes 256 MiB from glibc's malloc (not numpy, which asks for huge pages itself) after the entry
# point's call; prints the tunable and the page faults.
CHILD = """
import ctypes, os, resource
from clipjax import host_env
host_env.use_huge_pages()
n = 256 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
ctypes.memset(libc.malloc(n), 1, n)
print(os.environ.get("GLIBC_TUNABLES"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _child(**env):
    out = subprocess.run([sys.executable, "-c", CHILD], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not (host_env._glibc_supports_hugetlb() and host_env._thp_available()),
                    reason="needs glibc >= 2.35 and transparent huge pages (the setting does nothing elsewhere)")
def test_command_line_tools_run_large_buffers_on_huge_pages_when_asked():
    tunables, faults = _child(CLIPJAX_HUGE_PAGES="1")
    off_tunables, off_faults = _child()
    assert tunables == host_env.TUNABLE and off_tunables == "None"
    # 256 MiB in 4 KiB pages is 65,536 faults; in 2 MiB pages, about 128.
    assert off_faults > 60_000 and faults < off_faults / 10


def test_the_comparison_side_gets_the_users_environment_back():
    added = {"GLIBC_TUNABLES": f"glibc.malloc.check=0:{host_env.TUNABLE}", host_env.ADDED_MARK: "1", "A": "1"}
    assert host_env.without_added_tunables(added) == {"GLIBC_TUNABLES": "glibc.malloc.check=0", "A": "1"}
    users_own = {"GLIBC_TUNABLES": host_env.TUNABLE}
    assert host_env.without_added_tunables(users_own) == users_own
