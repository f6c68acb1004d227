"""The ``config.evals`` section: named evaluations, each with its own cadence.

Config files add entries made by the factories::

    c.evals.synth_zeroshot = zeroshot_eval(source="synthetic", split="heldout", every=100)
    c.evals.synth_retrieval = retrieval_eval(source="synthetic", split="heldout", max_examples=1000)
    c.evals.imagenet = zeroshot_eval(source="tfds", tfds_name="imagenet2012", split="validation",
                                     classnames="imagenet", templates="openai", every=5000)

Each entry is evaluated every ``every`` steps (0: only at the end of training)
and by ``clipjax-eval``. Unset data fields fall back to ``config.data``
(tokenizer, interpolation, synthetic settings); for ``source="synthetic"`` an
empty ``path`` means ``config.data.path`` when that is synthetic too.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from clipjax.data.config import SOURCES
from clipjax.evals.classnames import BUILTIN_CLASSNAMES, BUILTIN_TEMPLATES

EVAL_KINDS = ("zeroshot", "retrieval", "captioning")


def _common(kind: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "every": 0,  # steps between runs; 0 = only at the end of training (and in clipjax-eval)
        "source": "synthetic",  # synthetic | arrayrecord | tfds
        "path": "",  # ArrayRecord folder (arrayrecord; synthetic: "" -> config.data.path / default)
        "split": "",  # "" -> "heldout" for synthetic, "test" otherwise; TFDS slicing allowed
        "tfds_name": "",  # e.g. "cifar10", "imagenet2012", "coco_captions"
        "tfds_data_dir": "",  # "" -> config.data.tfds_data_dir
        "image_key": "image",  # TFDS image feature
        "label_key": "label",  # TFDS class-label feature ("" -> no labels)
        "text_key": "",  # TFDS caption feature(s), "/" for nested (retrieval)
        "batch_size": 256,  # global; rounded up to a multiple of the data-parallel size
        "max_examples": 0,  # 0 = the whole split; else the first N examples
        "num_workers": 0,  # grain workers for decoding (0: in the main process)
    }


def zeroshot_eval(**overrides: Any) -> ml_collections.ConfigDict:
    """A zero-shot classification entry: class names x templates, top-1/top-5 accuracy."""
    d = _common("zeroshot")
    d.update({
        "classnames": "synthetic",  # [names] | synthetic | imagenet | cifar10 | cifar100 | tfds | info | <path>
        "templates": "synthetic",  # [templates] | synthetic | openai | short | single | info | <path>
        "class_batch_size": 256,  # prompts embedded per text-tower call
    })
    return _apply(d, overrides, "zeroshot_eval")


def retrieval_eval(**overrides: Any) -> ml_collections.ConfigDict:
    """An image<->text retrieval entry: Recall@1/5/10, mean/median rank, embedding diagnostics."""
    d = _common("retrieval")
    d.update({
        "max_captions": 5,  # captions kept per image (the rest are dropped)
        "chunk_size": 0,  # caption columns per similarity tile; 0 = automatic (~8 MiB tile per device)
    })
    return _apply(d, overrides, "retrieval_eval")


def captioning_eval(**overrides: Any) -> ml_collections.ConfigDict:
    """A LocCa decoder entry (``model.decoder.enabled``): greedy captions scored by CIDEr and BLEU-4,
    referring-expression box accuracy (IoU >= 0.5) against the mean-box baseline."""
    return _apply(_common("captioning"), overrides, "captioning_eval")


def _apply(d: dict[str, Any], overrides: dict[str, Any], fn: str) -> ml_collections.ConfigDict:
    unknown = sorted(set(overrides) - set(d))
    if unknown:
        raise ValueError(f"{fn}(): unknown field(s) {unknown}; known: {sorted(d)}")
    d.update(overrides)
    return ml_collections.ConfigDict(d)


_FIELDS = {"zeroshot": set(zeroshot_eval().keys()), "retrieval": set(retrieval_eval().keys()),
           "captioning": set(captioning_eval().keys())}


def evals_config() -> ml_collections.ConfigDict:
    """No evaluations by default; config files add named entries."""
    return ml_collections.ConfigDict()


def default_split(entry: Any) -> str:
    """The split an entry evaluates: its ``split`` or the source's natural held-out split."""
    if entry["split"]:
        return entry["split"]
    return "heldout" if entry["source"] == "synthetic" else "test"


def _check_names(key: str, value: Any, builtin: tuple[str, ...]) -> None:
    """A list of strings, a built-in name or an existing file."""
    if isinstance(value, str):
        if value not in builtin and not os.path.exists(value):
            raise ValueError(f"{key}={value!r}: not one of {list(builtin)}, a list, or an existing file")
    elif not isinstance(value, (list, tuple)) or not value or not all(isinstance(x, str) and x for x in value):
        raise ValueError(f"{key}: give a non-empty list of strings, one of {list(builtin)}, or a file path")
    elif len(set(value)) != len(value):
        raise ValueError(f"{key}: {sorted({x for x in value if value.count(x) > 1})[:3]} listed twice")


def validate_evals_config(evals: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad ``config.evals.<name>.<field>``."""
    for name, e in evals.items():
        key = f"config.evals.{name}"
        if not name or "/" in name or " " in name:
            raise ValueError(f"{key}: eval names are metric path parts; no '/' or blanks")
        if not isinstance(e, (ml_collections.ConfigDict, dict)):
            raise ValueError(f"{key}: expected an entry from zeroshot_eval()/retrieval_eval(), got {type(e).__name__}")
        kind = e.get("kind")
        if kind not in EVAL_KINDS:
            raise ValueError(f"{key}.kind={kind!r}; choose one of {list(EVAL_KINDS)}")
        fields = set(e.keys())
        missing, unknown = sorted(_FIELDS[kind] - fields), sorted(fields - _FIELDS[kind])
        if missing:
            raise ValueError(f"{key}: missing field(s) {missing} (build entries with {kind}_eval(...))")
        if unknown:
            raise ValueError(f"{key}: unknown field(s) {unknown} for kind={kind!r}; known: {sorted(_FIELDS[kind])}")
        for f in ("every", "max_examples", "num_workers"):
            if not isinstance(e[f], int) or e[f] < 0:
                raise ValueError(f"{key}.{f}={e[f]!r} must be an integer >= 0")
        if not isinstance(e.batch_size, int) or e.batch_size <= 0:
            raise ValueError(f"{key}.batch_size={e.batch_size!r} must be a positive integer")
        if e.source not in SOURCES:
            raise ValueError(f"{key}.source={e.source!r}; choose one of {list(SOURCES)}")
        if e.source == "arrayrecord" and not e.path:
            raise ValueError(f"{key}.path: source='arrayrecord' needs the folder of shards")
        if e.source == "tfds":
            if not e.tfds_name:
                raise ValueError(f"{key}.tfds_name: source='tfds' needs a dataset name, e.g. 'cifar10'")
            if not e.image_key:
                raise ValueError(f"{key}.image_key: must name the TFDS image feature")
        if kind == "zeroshot":
            if e.source == "tfds" and not e.label_key:
                raise ValueError(f"{key}.label_key: zero-shot needs labels")
            _check_names(f"{key}.classnames", e.classnames, BUILTIN_CLASSNAMES)
            if e.classnames == "tfds" and e.source != "tfds":
                raise ValueError(f"{key}.classnames='tfds' needs source='tfds' (got {e.source!r})")
            _check_names(f"{key}.templates", e.templates, BUILTIN_TEMPLATES)
            if not isinstance(e.templates, str) and any(str(t).count("{}") != 1 for t in e.templates):
                raise ValueError(f"{key}.templates: each template needs exactly one '{{}}' for the class name, "
                                 f"e.g. 'a photo of a {{}}.'")
            if "info" in (e.classnames, e.templates) and e.source == "tfds":
                raise ValueError(f"{key}: classnames/templates='info' read the folder's info.json; source is tfds")
            if e.class_batch_size <= 0:
                raise ValueError(f"{key}.class_batch_size={e.class_batch_size} must be positive")
        elif kind == "retrieval":
            if e.source == "tfds" and not e.text_key:
                raise ValueError(f"{key}.text_key: retrieval on TFDS needs the caption feature, e.g. 'captions/text'")
            if e.max_captions < 1:
                raise ValueError(f"{key}.max_captions={e.max_captions} must be >= 1")
            if e.chunk_size < 0:
                raise ValueError(f"{key}.chunk_size={e.chunk_size} must be >= 0 (0 = automatic)")
