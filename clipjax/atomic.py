"""Files that appear complete or not at all: write beside the target, then rename."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path beside ``path``; renames it onto ``path`` when the block succeeds.

    The temporary name carries the process id, so processes writing the same file at
    once never share one; on an exception it is removed and ``path`` is left as it was.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
