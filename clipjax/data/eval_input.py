"""The grain eval stream: one unshuffled pass over a split, centre crops, all captions."""

from __future__ import annotations

import functools
from typing import Any, Iterator

import grain
import numpy as np

from clipjax.data import naflex
from clipjax.data import sources as sources_lib
from clipjax.data import transforms
from clipjax.data.loading import (DATASET_OPTIONS, SYNC_READ, LazyTokenizer, decode_or_none, mp_options,
                                  process_slot, to_global)


class _EvalElement:
    """Process-local position -> one centre-cropped example with all its captions (or padding)."""

    def __init__(self, source, *, process_index: int, process_count: int,
                 opts: transforms.ImageOptions | naflex.NaflexOptions,
                 tokenizer: LazyTokenizer, max_captions: int):
        self.source, self.opts, self.tokenizer, self.max_captions = source, opts, tokenizer, int(max_captions)
        self.records = sources_lib.shard_positions(len(source), process_index, process_count)
        nf = isinstance(opts, naflex.NaflexOptions)
        self.image_fn = naflex.eval_patches if nf else transforms.eval_image
        self.empty = naflex.empty_patches(opts.seq_len, opts.patch_size) if nf else transforms.empty_region()

    def __call__(self, position: int) -> dict[str, np.ndarray]:
        k, L = self.max_captions, self.tokenizer.context_length
        out = {**self.empty, "text": np.zeros((k, L), np.int32),
               "text_mask": np.zeros((k,), bool), "label": np.int32(-1), "mask": np.False_, "bad": np.False_}
        if position >= len(self.records):
            return out  # padding of the final batch
        ex = self.source[self.records[position]]
        out["label"] = np.int32(ex["label"])
        tok = self.tokenizer.get()
        captions = list(ex["captions"])[:k]
        out["text"][:] = tok.pad_id
        if captions:
            out["text"][: len(captions)] = tok(captions)
            out["text_mask"][: len(captions)] = True
        fields = decode_or_none(self.image_fn, ex["image"], self.opts)
        if fields is None:
            out["bad"] = np.True_  # kept as a masked row so positions stay aligned
        else:
            out.update(fields, mask=np.True_)
        return out


class EvalIterator:
    """One pass over a split, every process yielding the same number of batches.

    Yields the image fields of ``resize.IMAGE_KEYS`` and ``{"label": int32 [b] (-1: none),
    "text": int32 [b, K, L], "text_mask": bool [b, K], "mask": bool [b]}``; rows with
    ``mask`` False are padding (or undecodable images, counted in ``num_skipped``).
    """

    def __init__(self, ds: grain.IterDataset, *, num_batches: int, mesh=None):
        self._ds, self.num_batches, self.mesh = ds, num_batches, mesh
        self.num_skipped = 0
        self._it: Iterator | None = None

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> "EvalIterator":
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._it = iter(self._ds)
        try:
            batch = next(self._it)
        except StopIteration:
            self.close()
            raise
        self.num_skipped += int(batch.pop("bad").sum())
        return to_global(batch, self.mesh) if self.mesh is not None else batch

    def close(self) -> None:
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()


def make_eval_iterator(data_cfg_or_source_spec: Any, *, split: str, batch_size: int, image_size: int,
                       context_length: int, max_captions: int, process_index: int | None = None,
                       process_count: int | None = None, mesh=None, num_workers: int | None = None,
                       tokenizer: str | None = None, bpe_path: str | None = None, seq_len: int = 0,
                       patch_size: int = 0) -> EvalIterator:
    """One unshuffled pass over ``split`` with centre crops and all captions.

    ``data_cfg_or_source_spec``: a ``config.data`` dict or a string such as
    "synthetic:DIR", "arrayrecord:DIR", "tfds:NAME[@DATA_DIR]". ``batch_size`` is
    global: each process yields ``batch_size // process_count`` rows per batch.
    Examples are split ``process_index::process_count``; the final batch is padded
    (``mask`` False). Captions beyond ``max_captions`` are dropped. With ``seq_len`` > 0 the images are
    whole NaFlex images of at most ``seq_len`` patches of ``patch_size`` (``data.naflex``).
    """
    from clipjax.data.config import data_config

    spec = data_cfg_or_source_spec
    defaults = data_config()
    cfg = spec if not isinstance(spec, str) else defaults
    pi, pc = process_slot(process_index, process_count)
    if batch_size % pc:
        raise ValueError(f"batch_size={batch_size} is not divisible by process_count={pc}")
    local_batch = batch_size // pc
    source = sources_lib.open_source(spec, split)
    opts = naflex.image_options(cfg, image_size, seq_len, patch_size)
    tok = LazyTokenizer(tokenizer or cfg["tokenizer"], context_length,
                         bpe_path if bpe_path is not None else cfg["bpe_path"])
    fn = _EvalElement(source, process_index=pi, process_count=pc, opts=opts, tokenizer=tok,
                      max_captions=max_captions)
    # Same batch count on every process: collective eval steps must line up.
    per_process = -(-len(source) // pc)
    num_batches = -(-per_process // local_batch)
    ds = grain.MapDataset.range(num_batches * local_batch).map(fn).to_iter_dataset(SYNC_READ)
    ds = grain.experimental.WithOptionsIterDataset(ds, DATASET_OPTIONS)
    workers = int(cfg["num_workers"] if num_workers is None else num_workers)
    if workers > 0:
        ds = ds.mp_prefetch(mp_options(workers, 2))
    ds = ds.batch(local_batch, batch_fn=functools.partial(transforms.batch_rows, buffer_size=getattr(opts, "buffer_size", 0)))
    return EvalIterator(ds, num_batches=num_batches, mesh=mesh)
