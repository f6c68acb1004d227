"""Files that appear complete or not at all: write beside the target, then rename."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from etils import epath


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path beside ``path`` (local or a bucket); renames it onto ``path``
    when the block succeeds.

    The temporary name carries the process id, so processes writing the same file at
    once never share one; on an exception it is removed and ``path`` is left as it was.
    """
    tmp = epath.Path(f"{path}.tmp.{os.getpid()}")
    try:
        yield str(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` (local or a bucket) atomically, creating its folder."""
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        epath.Path(tmp).write_text(text, encoding="utf-8")
