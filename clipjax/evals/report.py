"""How evaluation results are shown and kept: the headline table and eval_<step>.{json,md}."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from clipjax.atomic import atomic_path
from clipjax.metrics import to_json_value
from clipjax.progress import format_value, table_lines

_HEADLINE_SUFFIXES = ("/top1", "/top5", "_r1", "_r5", "_r10", "_median_rank", "/modality_gap", "/pos_sim",
                      "/neg_sim", "/cider", "/bleu4", "/aref_acc")


def headline_table(metrics: Mapping[str, float], chance: Mapping[str, float]) -> dict[str, str]:
    """The headline metrics, in run order, each as ``"value  (chance c)"`` where a chance level is known."""
    return {key: format_value(value) + (f"  (chance {format_value(chance[key])})" if key in chance else "")
            for key, value in metrics.items() if key.endswith(_HEADLINE_SUFFIXES)}


def markdown_table(step: int, metrics: Mapping[str, float], chance: Mapping[str, float]) -> str:
    rows = [{"metric": key, "value": metrics[key], "chance": chance[key] if key in chance else ""} for key in sorted(metrics)]
    return "\n".join([f"# Evaluation at step {step}", ""] + table_lines(rows, markdown=True)) + "\n"


def write_files(workdir: str, name: str, step: int, metrics: Mapping[str, float], chance: Mapping[str, float],
                entries: Mapping[str, Any], differences: Mapping[str, tuple[Any, Any]] | None = None) -> str:
    """Writes ``WORKDIR/<name>.json`` (numbers, chance levels, the eval entries and the config fields
    that differ from the run's, as ``[run's, this]``) and ``<name>.md``; returns the base path."""
    base = os.path.join(workdir, name)
    payload = {"step": int(step), "metrics": {k: to_json_value(v) for k, v in metrics.items()},
               "chance": {k: to_json_value(v) for k, v in chance.items()},
               "evals": {n: e.to_dict() for n, e in entries.items()},
               "differs_from_run": {k: list(v) for k, v in (differences or {}).items()}}
    with atomic_path(base + ".json") as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
    with atomic_path(base + ".md") as tmp, open(tmp, "w") as f:
        f.write(markdown_table(step, metrics, chance))
    return base
