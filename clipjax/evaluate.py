"""``clipjax-eval``: evaluates a checkpoint of a run with the evaluations of its config."""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any

import jax

from clipjax import checkpoint as ckpt_lib
from clipjax import run
from clipjax.evals.evaluator import Evaluator
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
        raise ValueError("config.evals is empty: add entries with zeroshot_eval()/retrieval_eval() in the config file")
    setup, checkpointer = run.prepare(config, workdir, async_save=False)
    try:
        step = checkpointer.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}")
        # Params only: evaluation needs no optimizer state (and converted checkpoints hold none).
        params = checkpointer.restore_params(step, setup.abstract_state.params)
        saved = checkpointer.saved_config(step)
    finally:
        checkpointer.close()
    differences = {} if saved is None else ckpt_lib.config_differences(saved, config.to_json(), RESULT_SECTIONS)
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

