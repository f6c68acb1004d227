"""One writer per folder: an advisory ``flock`` that the kernel drops when its holder dies.

``clipjax-train`` holds ``WORKDIR/.lock`` for the whole run and ``clipjax-data convert``
holds ``OUT/.<split>.lock``, so a second run on the same folder stops with one line
naming the first (host and pid) instead of racing it. A crashed or killed holder
leaves the file but not the lock: the kernel releases ``flock`` locks with the last
open descriptor, so there is nothing stale to clean up.

Several processes of one run (a pod) must not lock each other out: only process 0
takes the lock (see ``clipjax.train``). Bucket paths (``gs://``) cannot be locked;
they are used unlocked.
"""

from __future__ import annotations

import fcntl
import os
import socket

from clipjax.errors import UserError


class FolderBusy(UserError, RuntimeError):
    """Another process holds the folder's lock."""


class FolderLock:
    """``with FolderLock(path, what=..., fix=...):`` holds ``path`` exclusively or raises FolderBusy."""

    def __init__(self, path: str, *, what: str, fix: str) -> None:
        self.path, self.what, self.fix = path, what, fix
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        if "://" in self.path:
            return self  # object stores have no locks
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FolderBusy(f"{self.what} is in use by {holder} (lock {self.path}); {self.fix}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (removing it would race a waiter)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
