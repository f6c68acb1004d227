"""What ``clipjax-embed`` and ``clipjax-predict`` read: ``(key, image or text)`` pairs from a folder,
a CSV, a text file or a folder of clipjax shards.

* a folder of images (any depth): key = the path below the folder, item = the file's path
* a folder of shards (``clipjax-data convert`` output): key = the record's key, item = its image
  bytes, or ``KEY#i`` and its ``i``-th caption for texts
* a CSV/TSV: key = the image column's value, item = that image (paths relative to the CSV's
  folder) or the text column's value
* a ``.txt`` file (texts only): key = the line number (from 1), item = the line
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import os
from typing import Iterator

from clipjax.data import records
from clipjax.data.convert.inputs import FOLDER_IMAGE_EXTS
from clipjax.errors import UserError

KINDS = ("image", "text")


@dataclasses.dataclass
class Listing:
    """``len(listing)`` pairs ``(key, item)``, read lazily by iteration."""

    source: str
    kind: str  # "image" or "text"
    length: int
    _pairs: object  # () -> Iterator[tuple[str, object]]

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[str, object]]:
        return self._pairs()


def is_shard_folder(path: str) -> bool:
    return bool(glob.glob(os.path.join(path, "*-?????-of-?????.array_record")))


def open_listing(source: str, kind: str = "image", *, split: str = "", img_key: str = "filepath",
                 caption_key: str = "title") -> Listing:
    """The pairs of ``source`` (see the module doc); ``split`` picks a shard folder's split (default: the only one)."""
    if kind not in KINDS:
        raise UserError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")
    if os.path.isdir(source):
        return _shards(source, kind, split) if is_shard_folder(source) else _image_folder(source, kind)
    if not os.path.isfile(source):
        raise UserError(f"{source}: no such file or folder")
    if source.lower().endswith((".csv", ".tsv")):
        return _csv(source, kind, img_key, caption_key)
    if source.lower().endswith(".txt"):
        if kind != "text":
            raise UserError(f"{source}: a .txt file holds texts (one a line); add --texts")
        with open(source, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
        return Listing(source, kind, len(lines), lambda: ((str(i + 1), t) for i, t in enumerate(lines)))
    raise UserError(f"{source}: expected a folder of images, a folder of clipjax shards, a .csv/.tsv or a .txt file")


def _image_folder(root: str, kind: str) -> Listing:
    if kind != "image":
        raise UserError(f"{root}: a folder of images has no texts; give a .txt file, a CSV or a shard folder")
    paths = sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names
                   if n.lower().endswith(FOLDER_IMAGE_EXTS) and not n.startswith("."))
    if not paths:
        raise UserError(f"{root}: no images (extensions {', '.join(FOLDER_IMAGE_EXTS)}) and no clipjax shards")
    return Listing(root, kind, len(paths), lambda: ((os.path.relpath(p, root), p) for p in paths))


def _shards(folder: str, kind: str, split: str) -> Listing:
    names = sorted({os.path.basename(p).rsplit("-", 3)[0] for p in glob.glob(os.path.join(folder, "*.array_record"))})
    if not split:
        if len(names) > 1:
            raise UserError(f"{folder} holds the splits {', '.join(names)}; choose one with --split")
        split = names[0]
    elif split not in names:
        raise UserError(f"{folder}: no split {split!r}; it holds {', '.join(names)}")
    import grain

    source = grain.sources.ArrayRecordDataSource(records.shard_paths(folder, split))

    def examples() -> Iterator[records.Example]:
        return (records.decode(source[i]) for i in range(len(source)))

    if kind == "image":
        return Listing(folder, kind, len(source), lambda: ((ex.key, ex.image) for ex in examples()))
    count = sum(len(ex.captions) for ex in examples())
    return Listing(folder, kind, count,
                   lambda: ((f"{ex.key}#{i}", c) for ex in examples() for i, c in enumerate(ex.captions)))


def _csv(path: str, kind: str, img_key: str, caption_key: str) -> Listing:
    sep = "\t" if path.lower().endswith(".tsv") else ","
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=sep)
        rows = list(reader)
        columns = reader.fieldnames or []
    wanted = img_key if kind == "image" else caption_key
    if wanted not in columns:
        flag = "--img_key" if kind == "image" else "--caption_key"
        raise UserError(f"{path}: no column {wanted!r}; columns are {columns} (set {flag})")
    folder = os.path.dirname(os.path.abspath(path))
    if kind == "image":
        return Listing(path, kind, len(rows),
                       lambda: ((r[img_key], os.path.join(folder, r[img_key])) for r in rows))
    key = img_key if img_key in columns else None
    return Listing(path, kind, len(rows),
                   lambda: ((r[key] if key else str(i + 1), r[caption_key]) for i, r in enumerate(rows)))
