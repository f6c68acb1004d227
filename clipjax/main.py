"""Thin command line: `clipjax-train` and `clipjax-eval`.

    clipjax-train --config=configs/NAME.py[:ARG] --workdir=DIR [--config.a.b=VALUE ...]
    clipjax-eval  --config=configs/NAME.py[:ARG] --workdir=DIR [--step=N]
    clipjax-train --config=... --compile_only --target=tpu:v5p:8x8x8   (plan only: nothing runs)
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
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "clipjax-train: compile the step for --target, print its memory and time plan, "
    "exit 1 if it does not fit; nothing runs and no --workdir is needed.")
_TARGET = flags.DEFINE_string(
    "target", None, "With --compile_only: tpu:<topology> (e.g. tpu:v5p:8x8x8, from any machine with libtpu) "
    "or cpu:N simulated devices; default: this machine's devices.")


def _setup() -> None:
    from clipjax import distributed

    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required")
    if not flags.FLAGS["verbosity"].present:
        # Library INFO lines (orbax's per-save chatter) would bury clipjax's own; --verbosity=0 brings them back.
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("clipjax").setLevel(logging.INFO)
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def _compile_only() -> None:
    from clipjax import compile_ahead
    from clipjax.bench.table import emit

    if _CONFIG.value is None:
        raise app.UsageError("--config is required")
    try:
        target = compile_ahead.parse_target(_TARGET.value) if _TARGET.value else None
        devices = compile_ahead.target_devices(target) if target else None
        if devices is None:
            import jax

            devices = jax.devices()
        row = compile_ahead.plan(_CONFIG.value, devices)
    except ValueError as e:  # TargetError, config/mesh mistakes
        sys.exit(f"clipjax-train --compile_only: {e}")
    emit([{"target": str(target or devices[0].platform), **row}])
    if not row["fits"]:
        sys.exit(f"does not fit: {row['mesh']} needs {row['peak_GiB']:.1f} GiB per device, "
                 f"{row['device']} has {row['hbm_GiB']:.1f} GiB (try model.remat, train.grad_accum or more fsdp)")


def _train(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _COMPILE_ONLY.value:
        _compile_only()
        return
    if _TARGET.value:
        raise app.UsageError("--target only applies with --compile_only")
    _setup()
    from clipjax import train

    train.train(_CONFIG.value, _WORKDIR.value)


def _eval(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _setup()
    from clipjax.evals import runner

    runner.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, step=_STEP.value)


def train_main() -> None:
    app.run(_train, argv=sys.argv)


def eval_main() -> None:
    app.run(_eval, argv=sys.argv)


if __name__ == "__main__":
    train_main()
