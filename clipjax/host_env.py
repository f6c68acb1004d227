"""Host memory setting for the command-line tools, opt-in: large allocations on huge pages.

XLA:CPU gives every execution fresh buffers for its temporaries; glibc maps each
allocation above its mmap threshold (at most 32 MiB) anew, and the kernel then
faults it in 4 KiB pages. A ViT-B/32 train step at batch 32 touches ~2 GiB that
way: ~550k page faults and ~1.5 s of kernel time a step on 2 cores. glibc's
``glibc.malloc.hugetlb=1`` tunable (glibc >= 2.35) asks for transparent huge pages
on those mappings (2 MiB pages: ~1.6k faults a step). That saved ~1.5% of a step on
a freshly booted VM, but on one that had run for hours the kernel spent 11-13 s a
step on the huge pages (the step went from 12.6 to 18.4 s), so it is off unless
``CLIPJAX_HUGE_PAGES=1``. Tunables are read when a process starts, so a
command-line tool re-executes itself once with the tunable set.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
ADDED_MARK = "CLIPJAX_ADDED_GLIBC_TUNABLES"  # set when clipjax, not the user, added the tunable


def _thp_available() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _glibc_supports_hugetlb() -> bool:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = (int(v) for v in version.split(".")[:2])
    except (ValueError, OSError, AttributeError):
        return False
    return name == "glibc" and (major, minor) >= (2, 35)


def use_huge_pages() -> None:
    """With ``CLIPJAX_HUGE_PAGES=1``, re-executes this process once with ``GLIBC_TUNABLES`` asking for huge pages.

    Call it first thing in a command-line entry point (nothing else runs twice). It does
    nothing without that variable, off Linux/glibc, when transparent huge pages are off,
    or when the user already set the tunable.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (os.environ.get("CLIPJAX_HUGE_PAGES", "0") != "1" or "glibc.malloc.hugetlb" in tunables
            or not sys.platform.startswith("linux") or not _glibc_supports_hugetlb() or not _thp_available()):
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(t for t in (tunables, TUNABLE) if t), **{ADDED_MARK: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def without_added_tunables(env: dict[str, str]) -> dict[str, str]:
    """``env`` as the user set it: the tunable this module added removed (for a comparison's other side)."""
    if env.get(ADDED_MARK) != "1":
        return env
    env = {k: v for k, v in env.items() if k != ADDED_MARK}
    rest = ":".join(t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and t != TUNABLE)
    if rest:
        env["GLIBC_TUNABLES"] = rest
    else:
        env.pop("GLIBC_TUNABLES", None)
    return env
