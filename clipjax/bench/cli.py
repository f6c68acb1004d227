"""`clipjax-bench SUITE [flags]`: runs one benchmark suite and prints a table.

Each suite is a module ``clipjax.bench.<suite>`` exposing ``main(argv) -> int``.
Suites parse their own flags (some must set XLA_FLAGS before jax is imported,
so this dispatcher imports nothing heavy).
"""

from __future__ import annotations

import importlib
import sys

from clipjax import host_env
from clipjax.errors import UserError, did_you_mean, run_cli

SUITES = {
    "loss": "clipjax.bench.loss",
    "data": "clipjax.bench.data",
    "compile": "clipjax.bench.compile",
    "plan": "clipjax.bench.plan",
    "train": "clipjax.bench.train",
    "convert": "clipjax.bench.convert",
    "masking": "clipjax.bench.masking",
    "patches": "clipjax.bench.patches",
    "vocab": "clipjax.bench.vocab",
}


USAGE = "usage: clipjax-bench {" + ",".join(SUITES) + "} [flags]  (SUITE --help for its flags)"
# What each suite measures (clipjax-bench --help); docs/benchmarks.md has the figures.
ABOUT = {
    "loss": "memory (compiled, per device) and time of the contrastive loss implementations at a batch size",
    "data": "input pipeline images/s (decode, crop box, batch) against a plain Pillow decode",
    "compile": "the train step compiled for a target (tpu:TOPOLOGY from any machine, or cpu:N): fits, peak "
               "memory, projected step time and MFU",
    "train": "the real compiled train step timed on this machine, side by side with OpenCLIP (--vs=openclip)",
    "convert": "clipjax-data convert images/s, one process against Beam's DirectRunner",
    "masking": "train step time with FLIP patch masking against none",
}


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 with one line on stderr for a user error)."""
    if argv is None:  # the command line, not a caller in this process
        host_env.configure()
    return run_cli("clipjax-bench", _main, argv)


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("\n".join([USAGE, "", "suites:", *(f"  {name:<9}{ABOUT[name]}" for name in SUITES)]))
        return 0 if argv else 2
    if argv[0] not in SUITES:
        raise UserError(f"unknown suite {argv[0]!r}{did_you_mean(argv[0], SUITES)} ({USAGE})")
    module = importlib.import_module(SUITES[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
