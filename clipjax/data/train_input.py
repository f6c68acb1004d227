"""The grain training stream: endless, shuffled, augmented, checkpointable.

Per process::

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
from typing import Any

import grain
import numpy as np
from grain.experimental import index_shuffle

from clipjax.data import naflex
from clipjax.data import sources as sources_lib
from clipjax.data import transforms
from clipjax.data.locca import DecoderTargets
from clipjax.data.loading import (DATASET_OPTIONS, SYNC_READ, LazyTokenizer, decode_or_none, log, mp_options,
                                  process_slot, to_global)
from clipjax.errors import UserError

# Up to this many records an epoch's permutation is a cached array: grain's index_shuffle
# cycle-walks, so on small sets it costs ~0.1 ms an index (3.5 us from ~1e5 records on).
_MAX_CACHED_PERMUTATION = 2**20
_STREAM_END = 2**62  # "endless": positions are plain ints, far beyond any run
# A grain element carries this many consecutive stream positions: one queue message and
# one state read per task instead of per example (both cost about as much as the copy).
_ROWS_PER_TASK = 16
_DECODER_STREAM = 1  # the decoder targets' generator: apart from the crop's, which stays as it was


DECODER_KEYS = ("dec_ids", "dec_target")


class DataError(UserError, RuntimeError):
    """The input pipeline cannot go on (e.g. too many undecodable images)."""


@functools.lru_cache(maxsize=16)
def _epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit permutation seed per (seed, epoch), well mixed."""
    return int(np.random.SeedSequence([seed, epoch, 0x5EED]).generate_state(1)[0])


class _TrainElement:
    """Stream position -> one prepared example (runs in grain workers; picklable)."""

    def __init__(self, source, *, seed: int, shuffle: bool, process_index: int, process_count: int,
                 opts: transforms.ImageOptions | naflex.NaflexOptions, tokenizer: LazyTokenizer, caption_choice: str,
                 decoder: DecoderTargets | None = None):
        self.source, self.seed, self.shuffle = source, int(seed), bool(shuffle)
        self.num_records = len(source)
        self.process_index, self.process_count = process_index, process_count
        self.local_len = len(range(process_index, self.num_records, process_count))
        if self.local_len == 0:
            raise DataError(f"{source!r}: {self.num_records} records leave none for process "
                            f"{process_index} of {process_count}; convert more data into it (clipjax-data convert)")
        self.opts, self.tokenizer, self.caption_choice = opts, tokenizer, caption_choice
        self.decoder = decoder
        self.image_fn = naflex.train_patches if isinstance(opts, naflex.NaflexOptions) else transforms.train_image
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
        decoder_rng = None
        if self.decoder is not None:
            decoder_rng = np.random.default_rng([self.seed, epoch, record, _DECODER_STREAM])
        return prepare_example(ex, rng, self.opts, self.tokenizer, self.caption_choice, self.decoder, decoder_rng,
                               self.image_fn)


def prepare_example(ex: dict[str, Any], rng: np.random.Generator, opts: transforms.ImageOptions,
                    tokenizer: LazyTokenizer, caption_choice: str, decoder: Any = None,
                    decoder_rng: np.random.Generator | None = None,
                    image_fn: Any = transforms.train_image) -> dict[str, np.ndarray]:
    """A source item's train fields (crop pixels, box, tokens; the decoder's targets when ``decoder``
    is given; ``image_fn`` cuts the image: a crop, or NaFlex patches), ``ok`` False when it must be skipped."""
    captions = ex["captions"]
    fields = decode_or_none(image_fn, ex["image"], rng, opts) if captions else None
    if fields is None:
        return {"ok": np.False_}
    k = int(rng.integers(len(captions))) if caption_choice == "random" else 0
    fields["text"] = tokenizer.get()([captions[k]])[0].astype(np.int32)
    crop_xyxy = fields.pop("crop_xyxy", None)  # only the decoder's targets need it: no batch field
    if decoder is not None:
        fields.update(decoder.build(fields["text"], ex.get("regions") or (), crop_xyxy, tokenizer.get(), decoder_rng))
    fields["ok"] = np.True_
    return fields


class _TrainTask:
    """Task index -> ``_ROWS_PER_TASK`` consecutive stream positions, prepared and packed."""

    def __init__(self, element_fn: _TrainElement):
        self.fn = element_fn

    def __call__(self, task: int) -> dict[str, np.ndarray]:
        start = task * _ROWS_PER_TASK
        rows = [self.fn(p) for p in range(start, start + _ROWS_PER_TASK)]
        ok_rows = [r for r in rows if r["ok"]]
        packed = {"ok": np.asarray([bool(r["ok"]) for r in rows])}
        # Fixed-shape fields are stacked (good rows only); crop pixels, whose size varies, are concatenated.
        for key in (k for k in (ok_rows[0] if ok_rows else ()) if k not in ("ok", "pixels")):
            packed[key] = np.stack([r[key] for r in ok_rows])
        if ok_rows and "pixels" in ok_rows[0]:
            pixels = np.empty((sum(r["pixels"].size for r in ok_rows),), np.uint8)
            offset = 0
            for r in ok_rows:
                size = r["pixels"].size
                pixels[offset:offset + size].reshape(r["pixels"].shape)[...] = r["pixels"]  # the only copy
                offset += size
            packed["pixels"] = pixels
        return packed


def _unpack(task: dict[str, np.ndarray]) -> list[dict[str, np.ndarray] | None]:
    """Inverse of ``_TrainTask``'s packing: one row per position, None where it was skipped."""
    rows: list[dict[str, np.ndarray] | None] = []
    offset, j = 0, 0  # into the pixels, into the stacked fields
    for ok in task["ok"]:
        if not ok:
            rows.append(None)
            continue
        row = {key: value[j] for key, value in task.items() if key not in ("ok", "pixels")}
        if "pixels" in task:
            h, w = (int(v) for v in row["image_hw"])
            row["pixels"] = task["pixels"][offset:offset + h * w * 3].reshape(h, w, 3)
            offset += h * w * 3
        rows.append(row)
        j += 1
    return rows


class _TrainBatches(grain.DatasetIterator):
    """Drops bad examples (counting them), stacks batches; state = stream position.

    The element iterator (with its worker processes) is built lazily from the
    position, so ``set_state`` right after construction starts workers only once.
    """

    def __init__(self, element_fn: _TrainElement, *, batch_size: int, num_workers: int, worker_buffer: int,
                 max_skip_fraction: float, skip_check_after: int, source_name: str):
        super().__init__()
        self.element_fn, self._batch_size = element_fn, int(batch_size)
        self._num_workers, self._worker_buffer = int(num_workers), int(worker_buffer)
        self._max_skip_fraction, self._skip_check_after = float(max_skip_fraction), int(skip_check_after)
        self._source_name = source_name
        self._position = self._skipped = 0
        self._elements: grain.DatasetIterator | None = None
        self._pending: collections.deque = collections.deque()  # rows of the current task not yet used

    def _open(self) -> grain.DatasetIterator:
        if self._elements is None:
            first, skip = divmod(self._position, _ROWS_PER_TASK)
            ds = grain.MapDataset.range(first, _STREAM_END // _ROWS_PER_TASK).map(_TrainTask(self.element_fn))
            ds = grain.experimental.WithOptionsIterDataset(ds.to_iter_dataset(SYNC_READ), DATASET_OPTIONS)
            if self._num_workers > 0:
                ds = ds.mp_prefetch(mp_options(self._num_workers, self._worker_buffer))
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
        return transforms.batch_rows(rows, getattr(self.element_fn.opts, "buffer_size", 0))

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

    def close(self) -> None:
        if self._elements is not None:
            self._elements.close()
            self._elements = None
            self._pending.clear()

    def __str__(self) -> str:
        return f"TrainBatches(batch_size={self._batch_size}, num_workers={self._num_workers})"


class TrainIterator:
    """Endless iterator of train batches with a checkpointable state.

    Yields ``{"image": uint8 [b, P, P, 3], "image_box": float32 [b, 4], "image_hw": int32 [b, 2],
    "text": int32 [b, L]}`` (the image fields are described in ``resize.py``, which
    turns them into model input on the device), or NaFlex fields (``models.naflex``) in place of the
    image's, and with decoder targets ``"dec_ids": int32 [b, N]``, ``"dec_target": bool [b, N]``
    (``data.locca``). ``b`` is the per-process batch as
    numpy, or the global batch as ``jax.Array`` sharded over the batch axes when a
    mesh was given. Save with the weights via ``save_args`` / ``restore_args``.
    """

    def __init__(self, batches: _TrainBatches, *, prefetch: int, mesh=None):
        self._element_fn = batches.element_fn
        self._top: grain.DatasetIterator = (
            grain.experimental.ThreadPrefetchDatasetIterator(batches, prefetch) if prefetch > 0 else batches)
        self.mesh = mesh

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self._top)
        return to_global(batch, self.mesh) if self.mesh is not None else batch

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
        fn, m = self._element_fn, len(states)
        if getattr(fn, "streaming", False):
            raise DataError(f"a webdataset stream saved by {m} processes cannot continue on another "
                            "count; resume with the same process count, or use config.data.webdataset.mode=random")
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
    def num_skipped(self) -> int:
        """Examples this process skipped (undecodable, no caption) up to the last batch yielded."""
        return int(self._top.get_state()["num_skipped"])

    @property
    def num_skipped_shards(self) -> int:
        """Shards cut short or unreachable (webdataset): counted once each, in the log too."""
        state = self._top.get_state()
        if "skipped_shards" in state:
            return int(state["skipped_shards"])
        return int(getattr(getattr(self._element_fn, "source", None), "num_skipped_shards", 0))

    def save_args(self) -> grain.checkpoint.CheckpointSave:
        """Orbax args saving the stream state as the item "data" (one JSON file per process)."""
        return grain.checkpoint.CheckpointSave(self._top)

    def restore_args(self) -> grain.checkpoint.CheckpointRestore:
        """Orbax args restoring the item "data" into this iterator in place."""
        return grain.checkpoint.CheckpointRestore(self._top)

    def close(self) -> None:
        self._top.close()

    def __enter__(self) -> "TrainIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stream_slot(data_cfg: Any, global_batch_size: int, seed: int, process_index: int | None,
                process_count: int | None) -> tuple[int, int, int]:
    """(process index, process count, per-process batch) of a train stream, after the checks every stream makes."""
    from clipjax.data.config import validate_data_config

    validate_data_config(data_cfg)
    pi, pc = process_slot(process_index, process_count)
    if global_batch_size % pc:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by process_count={pc}")
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0")
    return pi, pc, global_batch_size // pc


def make_train_iterator(data_cfg: Any, *, global_batch_size: int, image_size: int, context_length: int, seed: int,
                        mesh=None, process_index: int | None = None, process_count: int | None = None,
                        decoder: DecoderTargets | None = None, seq_len: int = 0, patch_size: int = 0) -> TrainIterator:
    """The endless, shuffled, augmented training stream of ``data_cfg.train_split``.

    ``process_index`` / ``process_count`` default to jax's; each process yields
    ``global_batch_size // process_count`` examples per batch (drop remainder: an
    endless stream has none). With ``decoder`` each example also carries its LocCa
    targets (``dec_ids``, ``dec_target``; see ``data.locca``).
    With ``seq_len`` > 0 the images are NaFlex patches (``data.naflex``: at most ``seq_len``
    patches of ``patch_size``) instead of crops.
    """
    pi, pc, local_batch = stream_slot(data_cfg, global_batch_size, seed, process_index, process_count)
    opts = naflex.image_options(data_cfg, image_size, seq_len, patch_size)
    tokenizer = LazyTokenizer(data_cfg.tokenizer, context_length, data_cfg.bpe_path)
    if data_cfg.source == "webdataset" and data_cfg.webdataset.mode == "stream":
        raise ValueError("data.webdataset.mode='stream' is read by clipjax.data.train_data.make_train_iterator")
    source = sources_lib.open_source(data_cfg, data_cfg.train_split)
    fn = _TrainElement(source, seed=seed, shuffle=data_cfg.shuffle, process_index=pi, process_count=pc,
                       opts=opts, tokenizer=tokenizer, caption_choice=data_cfg.caption_choice, decoder=decoder)
    workers = int(data_cfg.num_workers)
    # Workers keep about `prefetch` batches ready between them.
    worker_buffer = max(2, -(-max(1, data_cfg.prefetch) * local_batch // (max(1, workers) * _ROWS_PER_TASK)))
    batches = _TrainBatches(fn, batch_size=local_batch, num_workers=workers, worker_buffer=worker_buffer,
                            max_skip_fraction=data_cfg.max_skip_fraction,
                            skip_check_after=data_cfg.skip_check_after, source_name=repr(source))
    return TrainIterator(batches, prefetch=int(data_cfg.prefetch), mesh=mesh)

