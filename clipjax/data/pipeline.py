"""Grain input pipelines: an endless shuffled train stream and one-pass eval.

Train, per process::

    position p of this process's stream
      -> (epoch, record): the epoch's global permutation, entries
         process_index::process_count (disjoint across processes, together the epoch)
      -> read, decode (JPEG draft), draw the crop box, cut out     [grain workers]
         its pixels (uint8)
      -> tokenize one caption                                      [grain workers]
      -> drop undecodable examples, counting them; batch, padding   [main process]
         the crops into one [b, P, P, 3] buffer
      -> thread prefetch -> optional global jax.Array on a mesh
      -> resize each crop to the model's size, normalise            [device, resize.py]

All randomness of an example comes from ``(seed, epoch, record)`` and every
many-to-one step runs after the workers, so batches do not depend on
``num_workers``. The iterator state is the stream position plus the skip
counters (JSON), so a run can resume with another worker count.
"""

from __future__ import annotations

import collections
import functools
import logging
from typing import Any, Iterator

import grain
import numpy as np
from grain.experimental import index_shuffle
from PIL import Image

from clipjax.data import images as images_lib
from clipjax.data import sources as sources_lib
from clipjax.data import transforms
from clipjax.errors import UserError

log = logging.getLogger("clipjax.data")

# Up to this many records an epoch's permutation is a cached array: grain's index_shuffle
# cycle-walks, so on small sets it costs ~0.1 ms an index (3.5 us from ~1e5 records on).
_MAX_CACHED_PERMUTATION = 2**20
_STREAM_END = 2**62  # "endless": positions are plain ints, far beyond any run
# A grain element carries this many consecutive stream positions: one queue message and
# one state read per task instead of per example (both cost about as much as the copy).
_ROWS_PER_TASK = 16
# Arrays below this travel pickled; grain would otherwise make a shared-memory segment for
# every array, which costs more than copying a few KiB.
_DATASET_OPTIONS = grain.experimental.DatasetOptions(min_shm_size=1 << 16)
_SYNC_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # one core per worker, no reordering


class DataError(UserError, RuntimeError):
    """The input pipeline cannot go on (e.g. too many undecodable images)."""


# --------------------------------------------------------------------------- helpers


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    return int(process_index), int(process_count)


def _mp_options(num_workers: int, buffer: int) -> grain.MultiprocessingOptions:
    # grain's worker launch reads absl flags; programs that never parsed them (pytest, notebooks,
    # argparse CLIs) would fail with UnparsedFlagAccessError, so use the defaults.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer)


@functools.lru_cache(maxsize=16)
def _epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit permutation seed per (seed, epoch), well mixed."""
    return int(np.random.SeedSequence([seed, epoch, 0x5EED]).generate_state(1)[0])


class _LazyTokenizer:
    """Builds the tokenizer on first use, so it is created inside each worker."""

    def __init__(self, kind: str, context_length: int, bpe_path: str):
        self.kind, self.context_length, self.bpe_path = kind, int(context_length), bpe_path or None
        self._tok = None

    def get(self):
        if self._tok is None:
            from clipjax.data.tokenizer import get_tokenizer

            self._tok = get_tokenizer(self.kind, context_length=self.context_length, bpe_path=self.bpe_path)
        return self._tok

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__, _tok=None)


def _decode_or_none(fn, *args) -> dict[str, np.ndarray] | None:
    """The image's batch fields, or None for bad bytes (counted by the caller, never raised)."""
    try:
        return fn(*args)
    except (images_lib.BadImage, OSError, ValueError, Image.DecompressionBombError) as e:
        log.debug("skipping undecodable image: %s", e)
        return None


# --------------------------------------------------------------------------- train


class _TrainElement:
    """Stream position -> one prepared example (runs in grain workers; picklable)."""

    def __init__(self, source, *, seed: int, shuffle: bool, process_index: int, process_count: int,
                 opts: transforms.ImageOptions, tokenizer: _LazyTokenizer, caption_choice: str):
        self.source, self.seed, self.shuffle = source, int(seed), bool(shuffle)
        self.num_records = len(source)
        self.process_index, self.process_count = process_index, process_count
        self.local_len = len(range(process_index, self.num_records, process_count))
        if self.local_len == 0:
            raise ValueError(f"{source!r}: {self.num_records} records leave none for process "
                             f"{process_index} of {process_count}")
        self.opts, self.tokenizer, self.caption_choice = opts, tokenizer, caption_choice
        self._cached_epoch, self._cached_permutation = -1, np.zeros((0,), np.int64)

    def record_of(self, position: int) -> tuple[int, int]:
        """(epoch, record index) of a stream position."""
        epoch, k = divmod(int(position), self.local_len)
        slot = self.process_index + self.process_count * k  # this process's share of the epoch permutation
        if not self.shuffle or self.num_records == 1:
            return epoch, slot
        if self.num_records <= _MAX_CACHED_PERMUTATION:
            return epoch, int(self._permutation(epoch)[slot])
        return epoch, int(index_shuffle(slot, max_index=self.num_records - 1, seed=_epoch_seed(self.seed, epoch),
                                        rounds=4))

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._cached_epoch != epoch:
            rng = np.random.default_rng(_epoch_seed(self.seed, epoch))
            self._cached_permutation, self._cached_epoch = rng.permutation(self.num_records), epoch
        return self._cached_permutation

    def __getstate__(self) -> dict[str, Any]:  # workers rebuild the cache rather than unpickle it
        return dict(self.__dict__, _cached_epoch=-1, _cached_permutation=np.zeros((0,), np.int64))

    def __call__(self, position: int) -> dict[str, np.ndarray]:
        epoch, record = self.record_of(position)
        rng = np.random.default_rng([self.seed, epoch, record])
        try:
            ex = self.source[record]
        except (ValueError, KeyError, TypeError) as e:  # a corrupt record counts like a bad image
            log.debug("skipping unreadable record %d: %s", record, e)
            return {"ok": np.False_}
        captions = ex["captions"]
        fields = _decode_or_none(transforms.train_image, ex["image"], rng, self.opts) if captions else None
        if fields is None:
            return {"ok": np.False_}
        k = int(rng.integers(len(captions))) if self.caption_choice == "random" else 0
        fields["text"] = self.tokenizer.get()([captions[k]])[0].astype(np.int32)
        fields["ok"] = np.True_
        return fields


class _TrainTask:
    """Task index -> ``_ROWS_PER_TASK`` consecutive stream positions, prepared and packed."""

    def __init__(self, element_fn: _TrainElement):
        self.fn = element_fn

    def __call__(self, task: int) -> dict[str, np.ndarray]:
        start = task * _ROWS_PER_TASK
        rows = [self.fn(p) for p in range(start, start + _ROWS_PER_TASK)]
        n, length = len(rows), self.fn.tokenizer.context_length
        packed = {"ok": np.asarray([bool(r["ok"]) for r in rows]), "image_hw": np.zeros((n, 2), np.int32),
                  "image_box": np.zeros((n, 4), np.float32), "text": np.zeros((n, length), np.int32)}
        ok_rows = [(i, r) for i, r in enumerate(rows) if r["ok"]]
        pixels = np.empty((sum(r["pixels"].size for _, r in ok_rows),), np.uint8)
        offset = 0
        for i, r in ok_rows:
            for key in ("image_hw", "image_box", "text"):
                packed[key][i] = r[key]
            size = r["pixels"].size
            pixels[offset:offset + size].reshape(r["pixels"].shape)[...] = r["pixels"]  # the only copy
            offset += size
        packed["pixels"] = pixels
        return packed


def _unpack(task: dict[str, np.ndarray]) -> list[dict[str, np.ndarray] | None]:
    """Inverse of ``_TrainTask``'s packing: one row per position, None where it was skipped."""
    rows: list[dict[str, np.ndarray] | None] = []
    offset = 0
    for i, ok in enumerate(task["ok"]):
        if not ok:
            rows.append(None)
            continue
        h, w = (int(v) for v in task["image_hw"][i])
        rows.append({"pixels": task["pixels"][offset:offset + h * w * 3].reshape(h, w, 3),
                     "image_hw": task["image_hw"][i], "image_box": task["image_box"][i], "text": task["text"][i]})
        offset += h * w * 3
    return rows


class _TrainBatches(grain.DatasetIterator):
    """Drops bad examples (counting them), stacks batches; state = stream position.

    The element iterator (with its worker processes) is built lazily from the
    position, so ``set_state`` right after construction starts workers only once.
    """

    def __init__(self, element_fn: _TrainElement, *, batch_size: int, num_workers: int, worker_buffer: int,
                 max_skip_fraction: float, skip_check_after: int, source_name: str):
        super().__init__()
        self._fn, self._batch_size = element_fn, int(batch_size)
        self._num_workers, self._worker_buffer = int(num_workers), int(worker_buffer)
        self._max_skip_fraction, self._skip_check_after = float(max_skip_fraction), int(skip_check_after)
        self._source_name = source_name
        self._position = self._skipped = 0
        self._elements: grain.DatasetIterator | None = None
        self._pending: collections.deque = collections.deque()  # rows of the current task not yet used

    def _open(self) -> grain.DatasetIterator:
        if self._elements is None:
            first, skip = divmod(self._position, _ROWS_PER_TASK)
            ds = grain.MapDataset.range(first, _STREAM_END // _ROWS_PER_TASK).map(_TrainTask(self._fn))
            ds = grain.experimental.WithOptionsIterDataset(ds.to_iter_dataset(_SYNC_READ), _DATASET_OPTIONS)
            if self._num_workers > 0:
                ds = ds.mp_prefetch(_mp_options(self._num_workers, self._worker_buffer))
            self._elements = iter(ds)
            self._pending = collections.deque(_unpack(next(self._elements))[skip:])
        return self._elements

    def _next_row(self) -> dict[str, np.ndarray] | None:
        elements = self._open()
        while not self._pending:
            self._pending.extend(_unpack(next(elements)))
        return self._pending.popleft()

    def __next__(self) -> dict[str, Any]:
        rows: list[dict[str, np.ndarray]] = []
        while len(rows) < self._batch_size:
            row = self._next_row()
            self._position += 1
            if row is None:
                self._skipped += 1
                self._check_skips()
                continue
            rows.append(row)
        batch: dict[str, Any] = transforms.batch_regions(rows, self._fn.opts.buffer_size)
        batch["text"] = np.stack([r["text"] for r in rows])
        batch["num_skipped"] = int(self._skipped)
        return batch

    def _check_skips(self) -> None:
        seen = self._position
        if seen >= self._skip_check_after and self._skipped > self._max_skip_fraction * seen:
            raise DataError(
                f"input pipeline: {self._skipped} of {seen} examples read so far had undecodable images or no "
                f"captions ({self._skipped / seen:.2%}), more than config.data.max_skip_fraction="
                f"{self._max_skip_fraction:g}; check the data in {self._source_name}")

    def get_state(self) -> dict[str, Any]:
        return {"position": int(self._position), "num_skipped": int(self._skipped)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.close()
        self._position, self._skipped = int(state["position"]), int(state["num_skipped"])

    def start_prefetch(self) -> None:
        self._open()

    def close(self) -> None:
        if self._elements is not None:
            self._elements.close()
            self._elements = None
            self._pending.clear()

    def __str__(self) -> str:
        return f"TrainBatches(batch_size={self._batch_size}, num_workers={self._num_workers})"


def _to_global(batch: dict[str, Any], mesh) -> dict[str, Any]:
    import jax

    from clipjax import sharding

    return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v)
            if isinstance(v, np.ndarray) else v for k, v in batch.items()}


class TrainIterator:
    """Endless iterator of train batches with a checkpointable state.

    Yields ``{"image": uint8 [b, P, P, 3], "image_box": float32 [b, 4], "image_hw": int32 [b, 2],
    "text": int32 [b, L], "num_skipped": int}`` (the image fields are described in
    ``resize.py``, which turns them into model input on the device; ``num_skipped`` is
    cumulative on this process). ``b`` is the per-process batch as
    numpy, or the global batch as ``jax.Array`` sharded over the batch axes when a
    mesh was given. Save with the weights via ``save_args`` / ``restore_args``.
    """

    def __init__(self, batches: _TrainBatches, *, prefetch: int, mesh=None, local_batch_size: int,
                 source: Any = None):
        self._batches = batches
        self._top: grain.DatasetIterator = (
            grain.experimental.ThreadPrefetchDatasetIterator(batches, prefetch) if prefetch > 0 else batches)
        self.mesh, self.local_batch_size, self.source = mesh, local_batch_size, source

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self._top)
        return _to_global(batch, self.mesh) if self.mesh is not None else batch

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state: the next batch starts at this stream position."""
        return dict(self._top.get_state())

    def set_state(self, state: dict[str, Any]) -> None:
        self._top.set_state(state)

    def set_state_from_processes(self, states: list[dict[str, Any]]) -> None:
        """Continues a stream saved by ``len(states)`` processes (one state each, by process index).

        Process i of M reads global slots ``i, i + M, i + 2M ...`` of each epoch's
        permutation, so any process count reads the same global order. This process
        starts at the first global slot that no saved process had read; slots past it
        that a process ahead had already read (it skipped bad examples) are read again.
        """
        fn, m = self._batches._fn, len(states)
        n = fn.num_records

        def global_slot(position: int, index: int) -> int:
            epoch, k = divmod(position, len(range(index, n, m)))
            return epoch * n + index + m * k

        first_unread = min(global_slot(int(st["position"]), i) for i, st in enumerate(states))
        epoch, rest = divmod(first_unread, n)
        k = max(0, -(-(rest - fn.process_index) // fn.process_count))
        if fn.process_index + fn.process_count * k >= n:
            epoch, k = epoch + 1, 0
        skipped = sum(int(st["num_skipped"]) for st in states) // fn.process_count
        self.set_state({"position": epoch * fn.local_len + k, "num_skipped": skipped})

    @property
    def grain_iterator(self) -> grain.DatasetIterator:
        """The grain iterator whose state this is (what the orbax grain handler saves)."""
        return self._top

    def save_args(self):
        return save_args(self)

    def restore_args(self):
        return restore_args(self)

    def close(self) -> None:
        self._top.close()

    def __enter__(self) -> "TrainIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_args(it: TrainIterator):
    """Orbax args saving ``it``'s state as the item "data" (one JSON file per process)."""
    return grain.checkpoint.CheckpointSave(it.grain_iterator)


def restore_args(it: TrainIterator):
    """Orbax args restoring the item "data" into ``it`` in place."""
    return grain.checkpoint.CheckpointRestore(it.grain_iterator)


def make_train_iterator(data_cfg: Any, *, global_batch_size: int, image_size: int, context_length: int, seed: int,
                        mesh=None, process_index: int | None = None,
                        process_count: int | None = None) -> TrainIterator:
    """The endless, shuffled, augmented training stream of ``data_cfg.train_split``.

    ``process_index`` / ``process_count`` default to jax's; each process yields
    ``global_batch_size // process_count`` examples per batch (drop remainder: an
    endless stream has none).
    """
    from clipjax.data.config import validate_data_config

    validate_data_config(data_cfg)
    pi, pc = _process(process_index, process_count)
    if global_batch_size % pc:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by process_count={pc}")
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0")
    local_batch = global_batch_size // pc
    source = sources_lib.open_source(data_cfg, data_cfg.train_split)
    fn = _TrainElement(source, seed=seed, shuffle=data_cfg.shuffle, process_index=pi, process_count=pc,
                       opts=transforms.ImageOptions.from_config(data_cfg, image_size),
                       tokenizer=_LazyTokenizer(data_cfg.tokenizer, context_length, data_cfg.bpe_path),
                       caption_choice=data_cfg.caption_choice)
    workers = int(data_cfg.num_workers)
    # Workers keep about `prefetch` batches ready between them.
    worker_buffer = max(2, -(-max(1, data_cfg.prefetch) * local_batch // (max(1, workers) * _ROWS_PER_TASK)))
    batches = _TrainBatches(fn, batch_size=local_batch, num_workers=workers, worker_buffer=worker_buffer,
                            max_skip_fraction=data_cfg.max_skip_fraction,
                            skip_check_after=data_cfg.skip_check_after, source_name=repr(source))
    return TrainIterator(batches, prefetch=int(data_cfg.prefetch), mesh=mesh, local_batch_size=local_batch,
                         source=source)


# --------------------------------------------------------------------------- eval


class _EvalElement:
    """Process-local position -> one centre-cropped example with all its captions (or padding)."""

    def __init__(self, source, *, process_index: int, process_count: int, opts: transforms.ImageOptions,
                 tokenizer: _LazyTokenizer, max_captions: int):
        self.source, self.opts, self.tokenizer, self.max_captions = source, opts, tokenizer, int(max_captions)
        self.records = sources_lib.shard_positions(len(source), process_index, process_count)

    def __call__(self, position: int) -> dict[str, np.ndarray]:
        k, L = self.max_captions, self.tokenizer.context_length
        out = {**transforms.empty_region(), "text": np.zeros((k, L), np.int32),
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
        fields = _decode_or_none(transforms.eval_image, ex["image"], self.opts)
        if fields is None:
            out["bad"] = np.True_  # kept as a masked row so positions stay aligned
        else:
            out.update(fields, mask=np.True_)
        return out


def _batch_eval(rows: list[dict[str, np.ndarray]], buffer_size: int) -> dict[str, np.ndarray]:
    batch = transforms.batch_regions(rows, buffer_size)
    batch.update({key: np.stack([r[key] for r in rows]) for key in rows[0] if key not in ("pixels", *batch)})
    return batch


class EvalIterator:
    """One pass over a split, every process yielding the same number of batches.

    Yields the image fields of ``resize.IMAGE_KEYS`` and ``{"label": int32 [b] (-1: none),
    "text": int32 [b, K, L], "text_mask": bool [b, K], "mask": bool [b]}``; rows with
    ``mask`` False are padding (or undecodable images, counted in ``num_skipped``).
    """

    def __init__(self, ds: grain.IterDataset, *, num_batches: int, num_examples: int, mesh=None):
        self._ds, self.num_batches, self.num_examples, self.mesh = ds, num_batches, num_examples, mesh
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
        return _to_global(batch, self.mesh) if self.mesh is not None else batch

    def close(self) -> None:
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()


def make_eval_iterator(data_cfg_or_source_spec: Any, *, split: str, batch_size: int, image_size: int,
                       context_length: int, max_captions: int, process_index: int | None = None,
                       process_count: int | None = None, mesh=None, num_workers: int | None = None,
                       tokenizer: str | None = None, bpe_path: str | None = None) -> EvalIterator:
    """One unshuffled pass over ``split`` with centre crops and all captions.

    ``data_cfg_or_source_spec``: a ``config.data`` dict or a string such as
    "synthetic:DIR", "arrayrecord:DIR", "tfds:NAME[@DATA_DIR]". ``batch_size`` is
    global: each process yields ``batch_size // process_count`` rows per batch.
    Examples are split ``process_index::process_count``; the final batch is padded
    (``mask`` False). Captions beyond ``max_captions`` are dropped.
    """
    from clipjax.data.config import data_config

    spec = data_cfg_or_source_spec
    defaults = data_config()
    cfg = spec if not isinstance(spec, str) else defaults
    pi, pc = _process(process_index, process_count)
    if batch_size % pc:
        raise ValueError(f"batch_size={batch_size} is not divisible by process_count={pc}")
    local_batch = batch_size // pc
    source = sources_lib.open_source(spec, split)
    opts = transforms.ImageOptions.from_config(cfg, image_size)
    tok = _LazyTokenizer(tokenizer or cfg["tokenizer"], context_length,
                         bpe_path if bpe_path is not None else cfg["bpe_path"])
    fn = _EvalElement(source, process_index=pi, process_count=pc, opts=opts, tokenizer=tok,
                      max_captions=max_captions)
    # Same batch count on every process: collective eval steps must line up.
    per_process = -(-len(source) // pc)
    num_batches = -(-per_process // local_batch)
    ds = grain.MapDataset.range(num_batches * local_batch).map(fn).to_iter_dataset(_SYNC_READ)
    ds = grain.experimental.WithOptionsIterDataset(ds, _DATASET_OPTIONS)
    workers = int(cfg["num_workers"] if num_workers is None else num_workers)
    if workers > 0:
        ds = ds.mp_prefetch(_mp_options(workers, 2))
    ds = ds.batch(local_batch, batch_fn=functools.partial(_batch_eval, buffer_size=opts.buffer_size))
    return EvalIterator(ds, num_batches=num_batches, num_examples=len(fn.records), mesh=mesh)
