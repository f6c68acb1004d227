"""Thin command line: `clipjax-train` and `clipjax-eval`.

    clipjax-train --config=configs/NAME.py[:ARG] --workdir=DIR [--config.a.b=VALUE ...]
    clipjax-eval  --config=configs/NAME.py[:ARG] --workdir=DIR [--step=N]
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file path[:argument].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, TensorBoard, reports.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
_STEP = flags.DEFINE_integer("step", None, "clipjax-eval: checkpoint step to evaluate (default: latest).")


def _setup() -> None:
    from clipjax import distributed

    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required")
    if not flags.FLAGS["verbosity"].present:
        # Library INFO lines (orbax's per-save chatter) would bury clipjax's own; --verbosity=0 brings them back.
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("clipjax").setLevel(logging.INFO)
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def _train(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _setup()
    from clipjax import train

    train.train(_CONFIG.value, _WORKDIR.value)


def _eval(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _setup()
    from clipjax import evaluate

    evaluate.evaluate(_CONFIG.value, _WORKDIR.value, step=_STEP.value)


def train_main() -> None:
    app.run(_train, argv=sys.argv)


def eval_main() -> None:
    app.run(_eval, argv=sys.argv)
