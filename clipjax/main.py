"""Thin command line: `clipjax-train` and `clipjax-eval`.

    clipjax-train --config=configs/NAME.py[:ARG] --workdir=DIR [--config.a.b=VALUE ...]
    clipjax-eval  --config=configs/NAME.py[:ARG] --workdir=DIR [--step=N]
    clipjax-train --config=... --compile_only --target=tpu:v5p:8x8x8   (a plan: nothing runs)

Mistakes on the command line or in the config are one line on stderr and exit status 2
(``clipjax.errors``); ``--verbosity=0`` (or higher) shows tracebacks and library logs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import traceback
from typing import Callable, Sequence

from absl import app, flags
from absl import logging as absl_logging

from clipjax import host_env
from clipjax.errors import UserError, run_cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, TensorBoard, reports.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config and exit.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
_STEP = flags.DEFINE_integer("step", None, "clipjax-eval: checkpoint step to evaluate (default: latest).")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "compile the step for --target, print its memory and time plan and exit "
    "(1 if it does not fit); nothing runs, no --workdir or data needed")
_TARGET = flags.DEFINE_string(
    "target", None, "with --compile_only: tpu:TOPOLOGY (e.g. tpu:v5p:8x8x8; the TPU compiler, from any "
    "machine with clipjax[tpu]) or cpu:N simulated devices; default: this machine's devices")
_PLAN = flags.DEFINE_string(
    "plan", None, "a plan file of `clipjax-bench plan --out=FILE`: its mesh, remat, accumulation and loss "
    "overrides apply before the command line's --config.a.b=VALUE")

_HELP_ARGS = ("-h", "--help", "--helpshort", "--helpfull", "-?")
_METAVARS = {"plan": "FILE", "target": "tpu:TOPOLOGY", "workdir": "DIR", "coordinator": "HOST:PORT", "num_processes": "N", "process_id": "I", "step": "N"}
_FLAGS_OF = {
    "clipjax-train": ("workdir", "print_config", "compile_only", "target", "plan", "coordinator",
                      "num_processes", "process_id"),
    "clipjax-eval": ("workdir", "step", "print_config", "coordinator", "num_processes", "process_id"),
}
_ABOUT = {
    "clipjax-train": "Trains in WORKDIR, resuming from its latest checkpoint.",
    "clipjax-eval": "Evaluates a checkpoint in WORKDIR (default: the latest) with the config's evals.",
}


@dataclasses.dataclass
class CommandLine:
    """What the command line asked for: the config spec, its overrides, the other arguments."""

    prog: str
    spec: str | None
    overrides: list[str]
    args: list[str]

    def config(self):
        """The config file loaded with its argument and overrides (ConfigError for any mistake)."""
        from clipjax import config as config_lib

        if not self.spec:
            raise UserError(f"--config is required, e.g. {self.prog} --config=configs/demo.py --workdir=runs/demo")
        overrides = self.overrides
        if self.prog == "clipjax-train" and _PLAN.value:
            from clipjax import planner

            overrides = planner.read_overrides(_PLAN.value) + overrides  # the command line's own win
        return config_lib.load_config(self.spec, overrides)

    def check_no_args(self) -> None:
        if self.args:
            raise UserError(f"unexpected arguments: {' '.join(self.args)} (flags are --name=VALUE; see {self.prog} --help)")


def split_config_args(argv: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
    """Separates ``--config=SPEC`` and ``--config.a.b=VALUE`` from the other arguments."""
    spec, overrides, rest = None, [], []
    it = iter(enumerate(argv))
    for i, arg in it:
        name = arg.split("=", 1)[0]
        if name in ("--config", "-config"):
            spec = arg.split("=", 1)[1] if "=" in arg else next(it, (None, None))[1]
        elif name.lstrip("-").startswith(("config.", "noconfig.")):
            if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                arg = f"{arg}={next(it)[1]}"  # --config.a.b VALUE
            overrides.append(arg)
        else:
            rest.append(arg)
    return spec, overrides, rest


def _help(prog: str, spec: str | None) -> str:
    from clipjax import config as config_lib

    rows = [("--config=FILE[:ARG]", "config file and its argument, e.g. configs/demo.py:steps=300"),
            ("--config.a.b=VALUE", "set one config field (any field that --print_config lists)")]
    for name in _FLAGS_OF[prog]:
        flag = flags.FLAGS[name]
        rows.append((f"--{name}" + ("" if flag.boolean else f"={_METAVARS[name]}"), flag.help))
    rows.append(("--verbosity=N", "show tracebacks of errors and library logs (absl verbosity)"))
    lines = [f"usage: {prog} --config=FILE[:ARG] --workdir=DIR [--config.a.b=VALUE ...] [flags]", "",
             _ABOUT[prog], "", "flags:", *(f"  {flag:<24}{about}" for flag, about in rows)]
    return "\n".join(lines + [""] + config_lib.help_lines(spec, prog))


def _flags_parser(prog: str) -> Callable[[list[str]], CommandLine]:
    def parse(argv: list[str]) -> CommandLine:
        spec, overrides, rest = split_config_args(argv[1:])
        if any(a.split("=", 1)[0] in _HELP_ARGS for a in rest):
            print(_help(prog, spec))
            sys.exit(0)
        flags.FLAGS.unparse_flags()  # a second run in one process (tests) starts from the defaults
        try:
            args = flags.FLAGS([prog, *rest])
        except flags.Error as e:
            raise UserError(f"{e} (see {prog} --help)") from e
        return CommandLine(prog, spec, overrides, args[1:])

    return parse


def _print_config(config) -> None:
    from clipjax import config as config_lib
    from clipjax.errors import ConfigError

    try:
        config_lib.validate(config)  # derived values (model widths, token ids) filled in
    except ConfigError as e:
        print(f"# not valid yet: {e}", file=sys.stderr)
    print(config_lib.to_text(config))


def _setup(cmd: CommandLine) -> None:
    from clipjax import distributed

    cmd.check_no_args()
    if not _WORKDIR.value:
        raise UserError(f"--workdir is required: {cmd.prog} --config={cmd.spec} --workdir=DIR")
    if not flags.FLAGS["verbosity"].present:
        # Library INFO lines (orbax's per-save chatter) would bury clipjax's own; --verbosity=0 brings them back.
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("clipjax").setLevel(logging.INFO)
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def _train(cmd: CommandLine) -> None:
    config = cmd.config()
    if _PRINT_CONFIG.value:
        return _print_config(config)
    if _COMPILE_ONLY.value:
        from clipjax import compile_ahead

        cmd.check_no_args()
        sys.exit(compile_ahead.print_plan(config, _TARGET.value, cmd.prog))
    if _TARGET.value:
        raise UserError(f"--target applies with --compile_only only: {cmd.prog} --config={cmd.spec} "
                        f"--compile_only --target={_TARGET.value}")
    from clipjax.data.config import check_data_folder

    check_data_folder(config.data, cmd.spec)
    _setup(cmd)
    from clipjax import train

    train.train(config, _WORKDIR.value)


def _eval(cmd: CommandLine) -> None:
    config = cmd.config()
    if _PRINT_CONFIG.value:
        return _print_config(config)
    _setup(cmd)
    from clipjax import evaluate

    evaluate.evaluate(config, _WORKDIR.value, step=_STEP.value)


def _cpu_devices(argv: Sequence[str]) -> int | None:
    """The simulated CPU devices the command line's config needs (None: no config, several processes)."""
    spec, overrides, rest = split_config_args(argv)
    if not spec or any(a.split("=", 1)[0] in ("--num_processes", *_HELP_ARGS) for a in rest):
        return None
    from clipjax import config as config_lib, sharding

    try:
        config = config_lib.load_config(spec, overrides)
    except Exception:  # noqa: BLE001 - the run itself reports the mistake, in one line
        return None
    sizes = sharding.mesh_axis_sizes(config.mesh)
    return host_env.cpu_device_count(sizes, int(config.train.batch_size), len(os.sched_getaffinity(0)))


def _run(prog: str, body: Callable[[CommandLine], None], argv: Sequence[str] | None) -> None:
    if argv is None:  # the command line, not a caller in this process
        host_env.configure(lambda: _cpu_devices(sys.argv[1:]))
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        status = run_cli(prog, lambda a: app.run(body, argv=[prog, *a], flags_parser=_flags_parser(prog)), argv)
    except SystemExit as e:  # absl's app.run ends with sys.exit
        status = e.code
    except BaseException:
        if not _multiprocess():
            raise
        traceback.print_exc()
        status = 1
    if status not in (None, 0) and _multiprocess():
        if not isinstance(status, int):  # sys.exit("message")
            print(status, file=sys.stderr)
            status = 1
        from clipjax.distributed import exit_at_once

        exit_at_once(status)  # peers stuck in a collective must not hold this process in jax's shutdown
    sys.exit(status)


def _multiprocess() -> bool:
    """One process of several (``jax.distributed`` is up)."""
    if "jax" not in sys.modules:  # --help, a bad flag: jax never started
        return False
    from clipjax.distributed import is_multiprocess

    return is_multiprocess()


def train_main(argv: Sequence[str] | None = None) -> None:
    _run("clipjax-train", _train, argv)


def eval_main(argv: Sequence[str] | None = None) -> None:
    _run("clipjax-eval", _eval, argv)


if __name__ == "__main__":
    train_main()
