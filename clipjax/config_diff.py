"""What changed between the config a checkpoint saved and the config resuming it.

Three kinds of change: one that changes parameter shapes (``IncompatibleCheckpoint``: no
older step fits either); one that breaks exact resume, the data stream or the step's
randomness (``ResumeChanged`` unless ``checkpoint.accept_changes``); and the rest
(learning rate, steps, cadences), which are listed at resume and accepted.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from clipjax.errors import UserError

# Config fields that change parameter shapes or presence: a checkpoint is only
# compatible with a config that agrees on all of them.
SHAPE_KEYS = ("model.size", "model.embed_dim", "model.image", "model.text", "model.init_logit_bias", "model.scan",
              "loss.kind", "optim.lock_image", "optim.lock_text", "optim.clip_norm")
# Fields inside SHAPE_KEYS that change no shape (FLIP's mask ratio may change between runs).
SHAPE_FREE_KEYS = ("model.image.mask_ratio", "model.image.seq_len")  # FLIP ratio, NaFlex length
# Fields that decide which examples a step sees, in which crops, with which random numbers: after a
# change the resumed run no longer matches the uninterrupted one (grain's saved position means
# another thing for another batch size or dataset).
EXACT_RESUME_KEYS = ("seed", "train.batch_size", "data.source", "data.path", "data.train_split", "data.tfds_name",
                     "data.tfds_data_dir", "data.image_key", "data.text_key", "data.label_key",
                     "data.label_caption_template", "data.tokenizer", "data.bpe_path", "data.caption_choice",
                     "data.crop_scale", "data.crop_ratio", "data.shuffle", "data.synth")


class IncompatibleCheckpoint(UserError, ValueError):
    """The checkpoint in the workdir was written by a config with other shapes."""


class ResumeChanged(UserError, ValueError):
    """The config resuming a checkpoint changed a field that exact resume depends on."""


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _flatten(prefix: str, value: Any, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value


def config_differences(saved_json: str, current_json: str,
                       sections: Sequence[str] = ("",)) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved, current)}`` for the fields under ``sections`` (default: all) that differ;
    fields only one side has (newer than the checkpoint, or gone since) are not differences."""
    saved, current = json.loads(saved_json), json.loads(current_json)
    out = {}
    for section in sections:
        a, b = {}, {}
        _flatten(section, _get(saved, section) if section else saved, a)
        _flatten(section, _get(current, section) if section else current, b)
        out.update({k: (a[k], b[k]) for k in sorted(set(a) & set(b)) if a[k] != b[k]})
    return out


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _said(diffs: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diffs.items())


def check_compatible(saved_json: str, current_json: str) -> None:
    """Raises IncompatibleCheckpoint naming every shape-relevant key that differs."""
    diffs = {k: v for k, v in config_differences(saved_json, current_json, SHAPE_KEYS).items()
             if k not in SHAPE_FREE_KEYS}
    if diffs:
        raise IncompatibleCheckpoint("the checkpoint was written by an incompatible config: " + _said(diffs))


def check_resume(saved_json: str, current_json: str, *, step: int, accept_changes: bool) -> dict[str, tuple]:
    """Every field that differs from the checkpoint's config (to be listed at resume); raises
    ResumeChanged when one of them breaks exact resume and ``accept_changes`` is false."""
    diffs = config_differences(saved_json, current_json)
    breaking = {k: v for k, v in diffs.items() if _under(k, EXACT_RESUME_KEYS)}
    if breaking and not accept_changes:
        raise ResumeChanged(
            f"resuming step {step} with a config that changes the data stream or the randomness, so the run "
            f"would no longer match an uninterrupted one: {_said(breaking)}; put the values back, or accept "
            "the change with --config.checkpoint.accept_changes=true")
    return diffs
