"""Random-access example sources: clipjax ArrayRecord shards and TFDS data sources.

Every source is a picklable sequence (``len`` and ``src[i]``) whose items are
``{"image": bytes (encoded) | uint8 [H, W, C], "captions": list[str], "label": int}``
(label -1 when unknown; ArrayRecord items also carry ``regions``, see records.py), so the pipeline treats all sources alike. Sources
reopen their files lazily after unpickling, in each grain worker.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from clipjax.data import records


class ExampleSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


class ArrayRecordExamples:
    """The records of ``split`` in a folder of clipjax shards (records.py format)."""

    def __init__(self, folder: str, split: str):
        self.folder, self.split = folder, split
        self.paths = records.shard_paths(folder, split)
        self._reader = None
        self._len = len(self._open())

    def _open(self):
        if self._reader is None:
            import grain

            self._reader = grain.sources.ArrayRecordDataSource(self.paths)
        return self._reader

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = records.decode(self._open()[int(index)])
        return {"image": ex.image, "captions": ex.captions, "label": ex.label, "regions": ex.regions}

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__, _reader=None)  # file handles do not cross processes

    def __repr__(self) -> str:
        return f"ArrayRecordExamples({self.folder!r}, {self.split!r}, {self._len} records)"


def _get_path(features: Mapping[str, Any], key: str) -> Any:
    value: Any = features
    for part in key.split("/"):
        value = value[part]
    return value


def _as_str(x: Any) -> str:
    if isinstance(x, np.ndarray):
        x = x.item() if x.ndim == 0 else x
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class TfdsExamples:
    """A TFDS dataset read through ``tfds.data_source`` (ArrayRecord-prepared datasets).

    Captions come from ``text_key`` (a string or a list of strings, "/" for nested
    features), else from the class name of ``label_key`` through ``label_template``.
    """

    def __init__(self, name: str, split: str, *, data_dir: str | None = None, image_key: str = "image",
                 text_key: str = "", label_key: str = "label", label_template: str = "a photo of a {}."):
        self.name, self.split, self.data_dir = name, split, data_dir or None
        self.image_key, self.text_key, self.label_key, self.label_template = image_key, text_key, label_key, label_template
        self._ds = None
        ds = self._open()
        self._len = len(ds)
        self.class_names: list[str] | None = None
        if label_key:
            feature = _get_path(ds.dataset_info.features, label_key)
            self.class_names = list(getattr(feature, "names", None) or []) or None
        if not text_key and not self.class_names:
            raise ValueError(f"tfds {name!r}: no text_key and {label_key!r} has no class names to caption with")

    def _open(self):
        if self._ds is None:
            import tensorflow_datasets as tfds

            # download=False: a pod must not have every host download; prepare the dataset first.
            self._ds = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False)
        return self._ds

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self._open()[int(index)]
        label = int(_get_path(ex, self.label_key)) if self.label_key else -1
        if self.text_key:
            text = _get_path(ex, self.text_key)
            if isinstance(text, (list, tuple)) or (isinstance(text, np.ndarray) and text.ndim > 0):
                captions = [_as_str(t) for t in text]
            else:
                captions = [_as_str(text)]
        else:
            captions = [self.label_template.format(self.class_names[label])]
        return {"image": _get_path(ex, self.image_key), "captions": captions, "label": label}

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__, _ds=None)

    def __repr__(self) -> str:
        return f"TfdsExamples({self.name!r}, {self.split!r}, {self._len} records)"


def default_synthetic_path() -> str:
    root = os.environ.get("CLIPJAX_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "clipjax")
    return os.path.join(root, "synthetic")


def open_source(spec: Any, split: str) -> ExampleSource:
    """Opens ``split`` of a source given as a ``config.data`` dict or a string.

    Strings: ``"arrayrecord:DIR"``, ``"synthetic:DIR"`` (generated if missing, default
    settings), ``"tfds:NAME"``, ``"tfds:NAME@DATA_DIR"`` or ``"webdataset:SHARDS"`` (random access;
    ``split`` is not used). A plain directory means arrayrecord.
    """
    if isinstance(spec, str):
        from clipjax.data.config import data_config

        kind, _, rest = spec.partition(":") if ":" in spec else ("arrayrecord", "", spec)
        cfg = data_config()
        cfg.source = kind
        if kind == "tfds":
            cfg.tfds_name, _, cfg.tfds_data_dir = rest.partition("@")
        else:
            cfg.path = rest
        spec = cfg
    source = spec["source"]
    if source == "arrayrecord":
        return ArrayRecordExamples(spec["path"], split)
    if source == "synthetic":
        from clipjax.data import synth

        path = spec["path"] or default_synthetic_path()
        synth.ensure_synthetic(path, spec["synth"])
        return ArrayRecordExamples(path, split)
    if source == "tfds":
        return TfdsExamples(spec["tfds_name"], split, data_dir=spec["tfds_data_dir"], image_key=spec["image_key"],
                            text_key=spec["text_key"], label_key=spec["label_key"],
                            label_template=spec["label_caption_template"])
    if source == "webdataset":
        from clipjax.data.webdataset import WebDatasetExamples

        w = spec["webdataset"]
        return WebDatasetExamples(spec["path"], index_dir=w["index_dir"], retries=w["retries"],
                                  retry_delay_s=w["retry_delay_s"])
    raise ValueError(f"config.data.source: unknown source {source!r}")


def shard_positions(num_records: int, process_index: int, process_count: int) -> Sequence[int]:
    """Positions ``process_index::process_count`` of an epoch: disjoint, together all of it."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    return range(process_index, num_records, process_count)
