"""Class labels: values from a label column, COCO categories or folder names -> int labels
and the ``classes.txt`` that names them (one class name a line, line i = label i).

``classes.txt`` lives beside the shards and is shared by every split converted into
the folder: a split adds the names it has not seen at the end, so the labels of
splits written earlier never change. Zero-shot eval reads it with
``classnames=<folder>/classes.txt``.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from etils import epath

from clipjax.atomic import write_text
from clipjax.data.convert.options import ConvertError

CLASSES_FILE = "classes.txt"


def readable(name: str) -> str:
    """A folder or class name as text for a caption: ``"lawn_mower"`` -> ``"lawn mower"`` (as zero-shot
    eval reads class names)."""
    return " ".join(name.replace("_", " ").split())


def read_classes(path: str) -> list[str]:
    """Names from a class file, one a line (blank lines ignored)."""
    p = epath.Path(path)
    if not p.exists():
        raise ConvertError(f"class-name file {path} does not exist; give one name a line, in label order")
    names = [line.strip() for line in p.read_text(encoding="utf-8-sig").splitlines()]
    return [n for n in names if n]


class ClassNames:
    """The name -> label mapping of one output folder, grown as a split needs."""

    def __init__(self, out_dir: str, classes_file: str | None = None):
        self.path = os.path.join(out_dir, CLASSES_FILE)
        # An explicit file is the whole list; otherwise start from what earlier splits wrote.
        self.fixed = classes_file is not None
        if classes_file is not None:
            self.names = read_classes(classes_file)
            if epath.Path(self.path).exists() and read_classes(self.path) != self.names:
                raise ConvertError(f"{self.path} lists other classes than --classes {classes_file}; "
                                   "use the same list for every split of a folder, or a fresh --out")
        else:
            self.names = read_classes(self.path) if epath.Path(self.path).exists() else []
        dup = sorted({n for n in self.names if self.names.count(n) > 1})
        if dup:
            raise ConvertError(f"class names listed twice: {dup[:5]}; each name must appear once")
        self._index = {n: i for i, n in enumerate(self.names)}

    def add(self, names: Iterable[str], what: str) -> None:
        """Gives labels to new names (sorted, after the existing ones); refused with a fixed list."""
        new = sorted(set(names) - set(self._index))
        if new and self.fixed:
            raise ConvertError(f"{what}: class(es) {new[:5]} are not in --classes; add them to the file")
        for n in new:
            self._index[n] = len(self.names)
            self.names.append(n)

    def __getitem__(self, name: str) -> int:
        return self._index[name]

    def used(self, labels: Iterable[int]) -> dict[str, int]:
        """The names behind ``labels`` (what a split's records depend on, for its fingerprint)."""
        return {self.names[i]: i for i in sorted(set(labels)) if 0 <= i < len(self.names)}

    def write(self) -> None:
        if not self.names:
            return
        write_text(self.path, "".join(n + "\n" for n in self.names))


def label_values(values: Sequence[str], classes: ClassNames, what: str) -> list[int]:
    """Labels for raw label-column values: when all are integers they are the labels; otherwise every
    value is a class name, mapped through ``classes``. Empty values are -1 (unlabelled)."""
    stripped = [v.strip() for v in values]
    present = [v for v in stripped if v]
    if present and all(_is_int(v) for v in present):
        labels = [int(v) if v else -1 for v in stripped]
        if min(labels) < -1:
            raise ConvertError(f"{what}: negative label {min(labels)}; labels are 0, 1, ... (empty = unlabelled)")
        if classes.names and max(labels) >= len(classes.names):
            raise ConvertError(f"{what}: label {max(labels)} but {len(classes.names)} class names; "
                               "give a --classes file with a name for every label")
        return labels
    classes.add(present, what)
    return [classes[v] if v else -1 for v in stripped]


def _is_int(v: str) -> bool:
    try:
        int(v)
        return True
    except ValueError:
        return False
