"""What the train and eval input streams share: process slots, grain options, lazy
tokenizers, tolerant decoding, and the hand-over to global arrays."""

from __future__ import annotations

import logging
from typing import Any

import grain
import numpy as np
from PIL import Image

from clipjax.data import images as images_lib

log = logging.getLogger("clipjax")

# Arrays below this travel pickled; grain would otherwise make a shared-memory segment for
# every array, which costs more than copying a few KiB.
DATASET_OPTIONS = grain.experimental.DatasetOptions(min_shm_size=1 << 16)
SYNC_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # one core per worker, no reordering



def process_slot(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    return int(process_index), int(process_count)


def mp_options(num_workers: int, buffer: int) -> grain.MultiprocessingOptions:
    # grain's worker launch reads absl flags; programs that never parsed them (pytest, notebooks,
    # argparse CLIs) would fail with UnparsedFlagAccessError, so use the defaults.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer)


class LazyTokenizer:
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


def decode_or_none(fn, *args) -> dict[str, np.ndarray] | None:
    """The image's batch fields, or None for bad bytes (counted by the caller, never raised)."""
    try:
        return fn(*args)
    except (images_lib.BadImage, OSError, ValueError, Image.DecompressionBombError) as e:
        log.debug("skipping undecodable image: %s", e)
        return None


def to_global(batch: dict[str, Any], mesh) -> dict[str, Any]:
    import jax

    from clipjax import sharding

    return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v)
            if isinstance(v, np.ndarray) else v for k, v in batch.items()}
