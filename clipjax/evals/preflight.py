"""What can be checked about ``config.evals`` before any model exists, so a run never trains
for hours to fail at its first evaluation: the split's shards are there, class names and
templates load and are not empty, and the class list covers the split's labels (from the
converter's ``<split>-summary.json``)."""

from __future__ import annotations

import json
import os

from clipjax.data import records
from clipjax.errors import UserError
from clipjax.evals import datasets
from clipjax.evals.config import default_split


def _max_label(folder: str, split: str) -> int | None:
    """The largest label the converter wrote into ``split`` (None when its summary does not say)."""
    try:
        with open(os.path.join(folder, f"{split}-summary.json"), encoding="utf-8") as f:
            return json.load(f).get("max_label")
    except (OSError, ValueError):
        return None


def check_entries(config) -> dict[str, tuple]:
    """Raises UserError naming the first entry that cannot run; returns the zero-shot entries'
    ``{name: (class names, templates, tokenizer)}`` for the evaluator to reuse."""
    prompts: dict[str, tuple] = {}
    for name, e in config.evals.items():
        where, split = f"config.evals.{name}", default_split(e)
        if e.source == "arrayrecord":
            try:
                records.shard_paths(e.path, split)
            except FileNotFoundError:
                raise UserError(f"{where}: no shards of split {split!r} in {e.path!r}; convert it with "
                                f"clipjax-data convert ... --split={split} or set {where}.split") from None
        if e.kind != "zeroshot":
            continue
        data_cfg = datasets.eval_data_config(config, e)
        try:
            names, templates, tokenize = datasets.zeroshot_prompts(config, e, data_cfg)
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"{where}: {err}") from None
        if not names:
            raise UserError(f"{where}.classnames={e.classnames!r} lists no class names; give one name per line, "
                            "in label order")
        top = _max_label(e.path, split) if e.source == "arrayrecord" else None
        if top is not None and top >= len(names):
            raise UserError(f"{where}: split {split!r} of {e.path} has labels up to {top} but classnames lists "
                            f"{len(names)} names; give one name per label, in label order "
                            f"(e.g. classnames={os.path.join(e.path, 'classes.txt')})")
        prompts[name] = (names, templates, tokenize)
    return prompts
