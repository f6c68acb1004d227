"""``clipjax-eval``: evaluates a checkpoint of a run with the evaluations of its config."""

from __future__ import annotations

import logging

import jax

from clipjax import run
from clipjax.evals.evaluator import Evaluator
from clipjax.evals.report import headline_table, write_files
from clipjax.progress import Progress

log = logging.getLogger("clipjax")


def evaluate(config, workdir: str, step: int | None = None) -> dict[str, float]:
    """Restores ``workdir``'s latest (or ``step``'s) params, runs every eval of ``config.evals``,
    prints the headline table and writes ``WORKDIR/eval_<step>.{json,md}``; returns the metrics."""
    if not len(config.evals):
        raise ValueError("config.evals is empty: add entries with zeroshot_eval()/retrieval_eval() in the config file")
    setup, checkpointer = run.prepare(config, workdir, async_save=False)
    try:
        step = checkpointer.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}")
        # Params only: evaluation needs no optimizer state (and converted checkpoints hold none).
        params = checkpointer.restore_params(step, setup.abstract_state.params)
    finally:
        checkpointer.close()
    evaluator = Evaluator(config, setup)
    metrics, chance = evaluator.run(params)
    if jax.process_index() == 0:
        Progress().table("evaluation", headline_table(metrics, chance), step)
        base = write_files(workdir, step, metrics, chance, evaluator.entries)
        log.info("wrote %s.json and %s.md", base, base)
    return metrics


if __name__ == "__main__":
    from clipjax.main import eval_main

    eval_main()
