"""`clipjax-bench SUITE [flags]`: runs one benchmark suite and prints a table.

Each suite is a module ``clipjax.bench.<suite>`` exposing ``main(argv) -> int``.
Suites parse their own flags (some must set XLA_FLAGS before jax is imported,
so this dispatcher imports nothing heavy).
"""

from __future__ import annotations

import importlib
import sys

SUITES = {
    "loss": "clipjax.bench.loss",
    "data": "clipjax.bench.data",
    "compile": "clipjax.bench.compile",
    "train": "clipjax.bench.train",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUITES:
        print("usage: clipjax-bench {" + ",".join(SUITES) + "} [flags]  (SUITE --help for its flags)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUITES[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
