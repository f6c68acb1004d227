"""The clipjax example record and its ArrayRecord shards.

One record is a msgpack map::

    {"key": str, "image": bytes (encoded JPEG/PNG/WebP), "captions": [str, ...],
     "label": int (optional, -1 when absent),
     "regions": [{"box": [x0, y0, x1, y1], "text": str}, ...] (optional)}

Region boxes are fractions of the image's width and height (0 at the top left).

Shards are ``<dir>/<split>-SSSSS-of-NNNNN.array_record``; a folder of shards is
read with ``shard_paths(dir, split)``.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

import msgpack
from array_record.python import array_record_module

from clipjax.atomic import atomic_path


@dataclass(frozen=True)
class Example:
    key: str
    image: bytes
    captions: list[str] = field(default_factory=list)
    label: int = -1
    regions: list[dict] = field(default_factory=list)  # {"box": [x0, y0, x1, y1] fractions, "text": str}


def encode(example: Example) -> bytes:
    d = {"key": example.key, "image": example.image, "captions": list(example.captions), "label": int(example.label)}
    if example.regions:  # absent rather than empty: records without regions stay byte-identical
        d["regions"] = [{"box": [float(v) for v in r["box"]], "text": str(r["text"])} for r in example.regions]
    return msgpack.packb(d, use_bin_type=True)


def decode(record: bytes) -> Example:
    d = msgpack.unpackb(record, raw=False)
    return Example(key=d["key"], image=d["image"], captions=list(d.get("captions", [])), label=int(d.get("label", -1)),
                   regions=list(d.get("regions", [])))


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def shard_paths(folder: str, split: str) -> list[str]:
    """Sorted shard paths of ``split`` in ``folder``; a clear error if there are none."""
    paths = sorted(glob.glob(os.path.join(folder, f"{split}-?????-of-?????.array_record")))
    if not paths:
        raise FileNotFoundError(f"no ArrayRecord shards for split {split!r} in {folder!r}")
    return paths


class ShardWriter:
    """Writes encoded examples to one ArrayRecord shard, atomically on close.

    The shard is written beside its final name (``atomic.atomic_path``) and renamed when
    closed, so a killed converter never leaves a half-written shard under its final
    name, and processes writing the same shard at once (identical bytes) never share a file.
    """

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._target = atomic_path(path)
        self._writer = array_record_module.ArrayRecordWriter(self._target.__enter__(), "group_size:1")
        self.count = 0

    def write(self, example: Example) -> None:
        self._writer.write(encode(example))
        self.count += 1

    def close(self) -> None:
        self.__exit__(None, None, None)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._writer.close()
        self._target.__exit__(exc_type, exc, tb)
