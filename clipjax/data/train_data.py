"""The training stream a data config names: grain's random-access pipeline (``train_input``) or
sequential webdataset streaming (``webdataset_stream``, which builds on it)."""

from __future__ import annotations

from typing import Any

from clipjax.data import train_input, transforms
from clipjax.data.loading import LazyTokenizer
from clipjax.data.locca import DecoderTargets


def make_train_iterator(data_cfg: Any, *, global_batch_size: int, image_size: int, context_length: int, seed: int,
                        mesh=None, process_index: int | None = None, process_count: int | None = None,
                        decoder: DecoderTargets | None = None, seq_len: int = 0,
                        patch_size: int = 0) -> train_input.TrainIterator:
    """``train_input.make_train_iterator``'s stream, or for ``data.webdataset.mode='stream'`` the same
    batches read shard by shard (``webdataset_stream``; crops only: no decoder targets, no NaFlex)."""
    kwargs = dict(global_batch_size=global_batch_size, image_size=image_size, context_length=context_length,
                  seed=seed, mesh=mesh, process_index=process_index, process_count=process_count)
    if not (data_cfg.source == "webdataset" and data_cfg.webdataset.mode == "stream"):
        return train_input.make_train_iterator(data_cfg, decoder=decoder, seq_len=seq_len, patch_size=patch_size,
                                               **kwargs)
    from clipjax.data import webdataset_stream

    if decoder is not None or seq_len:
        raise ValueError("data.webdataset.mode='stream' builds crops only (no LocCa decoder targets, no NaFlex "
                         "patches); use data.webdataset.mode='random' with model.decoder or model.image.seq_len")
    pi, pc, local_batch = train_input.stream_slot(data_cfg, global_batch_size, seed, process_index, process_count)
    batches = webdataset_stream.stream_batches(
        data_cfg, seed=seed, process_index=pi, process_count=pc, local_batch=local_batch,
        opts=transforms.ImageOptions.from_config(data_cfg, image_size),
        tokenizer=LazyTokenizer(data_cfg.tokenizer, context_length, data_cfg.bpe_path))
    return train_input.TrainIterator(batches, prefetch=int(data_cfg.prefetch), mesh=mesh)
