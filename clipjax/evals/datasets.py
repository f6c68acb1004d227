"""What an eval entry reads: its data config, class names, templates, tokenizer and batches."""

from __future__ import annotations

import logging
from typing import Any, Iterator

import ml_collections

from clipjax.evals import classnames as classnames_lib
from clipjax.evals.config import default_split

log = logging.getLogger("clipjax")


def eval_data_config(config, entry) -> ml_collections.ConfigDict:
    """``config.data`` with the eval entry's source fields swapped in (tokenizer, resizing... kept)."""
    d = ml_collections.ConfigDict(config.data.to_dict())
    d.source = entry.source
    if entry.source == "synthetic":
        d.path = entry.path or (config.data.path if config.data.source == "synthetic" else "")
    elif entry.source == "arrayrecord":
        d.path = entry.path
    else:
        d.tfds_name = entry.tfds_name
        d.tfds_data_dir = entry.tfds_data_dir or config.data.tfds_data_dir
        d.image_key, d.label_key, d.text_key = entry.image_key, entry.label_key, entry.text_key
    d.num_workers = entry.num_workers
    return d


def _folder(data_cfg) -> str:
    if data_cfg.source == "tfds":
        return ""
    if data_cfg.source == "synthetic" and not data_cfg.path:
        from clipjax.data.sources import default_synthetic_path

        return default_synthetic_path()
    return data_cfg.path


def zeroshot_prompts(config, entry, data_cfg) -> tuple[list[str], list[str], Any]:
    """``(class names, templates, tokenizer)`` of a zero-shot entry."""
    tfds_names = None
    if entry.classnames == "tfds":
        from clipjax.data import sources as sources_lib

        tfds_names = sources_lib.open_source(data_cfg, default_split(entry)).class_names
    folder = _folder(data_cfg)
    if data_cfg.source == "synthetic" and folder:
        from clipjax.data import synth

        synth.ensure_synthetic(folder, data_cfg.synth)  # info.json (class list) must exist
    names = classnames_lib.get_classnames(entry.classnames, folder=folder, tfds_names=tfds_names)
    templates = classnames_lib.get_templates(entry.templates, folder=folder)
    from clipjax.data.tokenizer import get_tokenizer

    tokenize = get_tokenizer(data_cfg.tokenizer, context_length=config.model.text.context_length,
                             bpe_path=data_cfg.bpe_path or None)
    return names, templates, tokenize


def global_batches(config, entry, data_cfg, mesh, *, batch_size: int, max_captions: int) -> Iterator[dict]:
    """Global (sharded) batches, stopping once ``max_examples`` rows were read (same count on all processes)."""
    from clipjax.data import eval_input

    split = default_split(entry)
    it = eval_input.make_eval_iterator(
        data_cfg, split=split, batch_size=batch_size, image_size=config.model.image.image_size,
        context_length=config.model.text.context_length, max_captions=max_captions,
        num_workers=entry.num_workers, mesh=mesh, seq_len=config.model.image.seq_len,
        patch_size=config.model.image.patch_size)
    limit = -(-entry.max_examples // batch_size) if entry.max_examples else None
    try:
        for i, batch in enumerate(it):
            if limit is not None and i >= limit:
                break
            yield batch
    finally:
        it.close()
        if it.num_skipped:
            log.warning("eval on %s: %d undecodable images skipped", split, it.num_skipped)
