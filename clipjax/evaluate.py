"""``clipjax-eval``: evaluates a checkpoint of a run with the evaluations of its config."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from typing import Any

import jax

from clipjax import checkpoint as ckpt_lib
from clipjax import config_diff
from clipjax import run
from clipjax.evals.evaluator import Evaluator
from clipjax.errors import UserError
from clipjax.evals.report import headline_table, write_files
from clipjax.progress import Progress

log = logging.getLogger("clipjax")


# The sections whose fields can change an evaluation's numbers.
RESULT_SECTIONS = ("evals", "model", "data")


def evaluate(config, workdir: str, step: int | None = None) -> dict[str, float]:
    """Restores ``workdir``'s latest (or ``step``'s) params, runs every eval of ``config.evals``,
    prints the headline table and writes ``WORKDIR/eval_<step>[-<differences>].{json,md}``; returns
    the metrics. Results of a config that differs from the run's own carry the differences in their
    name, so they never replace the run's results (nor those of other overrides)."""
    if not len(config.evals):
        raise UserError("config.evals is empty: add entries with zeroshot_eval()/retrieval_eval() in the config file")
    if not os.path.isdir(ckpt_lib.checkpoint_dir(workdir)):  # checked first: a mistyped path is not created
        raise UserError(f"no checkpoints in --workdir={workdir} ({ckpt_lib.checkpoint_dir(workdir)} does not exist); "
                        "give the workdir of a clipjax-train run")
    setup, checkpointer = run.prepare(config, workdir, async_save=False)
    try:
        steps = checkpointer.all_steps()
        if not steps or (step is not None and int(step) not in steps):
            raise UserError(f"{'no checkpoint' if not steps else f'no checkpoint of step {step}'} in "
                            f"{ckpt_lib.checkpoint_dir(workdir)}"
                            + (f"; saved steps: {', '.join(map(str, steps))} (--step=N, or leave --step out "
                               "for the latest)" if steps else "; train first (clipjax-train)"))
        step = steps[-1] if step is None else int(step)
        # Params only: evaluation needs no optimizer state (and converted checkpoints hold none).
        params = checkpointer.restore_params(step, setup.abstract_state.params)
        saved = checkpointer.saved_config(step)
    finally:
        checkpointer.close()
    differences = {} if saved is None else config_diff.config_differences(saved, config.to_json(), RESULT_SECTIONS)
    evaluator = Evaluator(config, setup)
    metrics, chance = evaluator.run(params)
    if jax.process_index() == 0:
        Progress().table("evaluation", headline_table(metrics, chance), step)
        base = write_files(workdir, f"eval_{step}{name_suffix(differences)}", step, metrics, chance,
                           evaluator.entries, differences)
        log.info("wrote %s.json and %s.md", base, base)
    return metrics


def name_suffix(differences: dict[str, tuple[Any, Any]], max_chars: int = 80) -> str:
    """``""`` for the run's own config, else ``"-key=value,..."`` (file-name safe; long ones shortened
    and made unique by a hash of the whole list)."""
    if not differences:
        return ""
    text = ",".join(f"{k}={v}" for k, (_, v) in sorted(differences.items()))
    safe = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", text)
    if len(safe) > max_chars:
        safe = safe[:max_chars - 9] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return "-" + safe

