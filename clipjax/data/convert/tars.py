"""WebDataset tars (img2dataset output): listing, and streaming one tar into ``Item``s.

A tar is read as a stream (never extracted, never seeked, so bucket paths work) and
its members are grouped by key, the path up to the first dot of the file name. The
image is ``.jpg``/``.jpeg``/``.png``/``.webp``, the caption ``.txt``, else the
``caption`` field of ``.json``.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import os
import posixpath
import sys
import tarfile
from typing import Any, BinaryIO, Callable, Iterator, Sequence

from etils import epath

from clipjax.data.convert.example import Item, ShardStats
from clipjax.data.convert.options import ConvertError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TAR_PATTERNS = tuple("*" + s for s in TAR_SUFFIXES)


def is_unsafe_member(name: str) -> bool:
    """Whether a tar member path is absolute or could leave a destination folder (``..``)."""
    if not name or "\x00" in name:
        return True
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):  # POSIX or drive-absolute
        return True
    if ".." in unified.split("/"):
        return True
    norm = posixpath.normpath(posixpath.join("/out", unified))
    return not norm.startswith("/out/")


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the file name, ext = the rest."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def is_remote(path: str) -> bool:
    return "://" in path


def _glob(pattern: str) -> list[str]:
    if not is_remote(pattern):
        return glob.glob(pattern)
    folder, name = pattern.rsplit("/", 1)  # bucket globs: wildcards in the last component only
    return [os.fspath(p) for p in epath.Path(folder).glob(name)]


def tar_paths(inputs: Sequence[str]) -> list[str]:
    """Tar paths from files, globs and folders (their ``*.tar``, ``*.tar.gz``, ``*.tgz``), sorted, deduplicated."""
    paths: list[str] = []
    for spec in inputs:
        if any(ch in spec for ch in "*?["):
            paths += _glob(spec)
        elif epath.Path(spec).is_dir():
            paths += [q for pat in TAR_PATTERNS for q in _glob(spec.rstrip("/") + "/" + pat)]
        else:
            paths.append(spec)
    paths = sorted(set(paths))
    if not paths:
        raise ConvertError(f"no tar files in {list(inputs)}; give tar files, globs or folders holding *.tar")
    missing = [p for p in paths if not epath.Path(p).is_file()]
    if missing:
        raise ConvertError(f"tar file(s) not found: {missing[:5]}")
    return paths


def tar_tags(paths: Sequence[str]) -> list[str]:
    """The key prefix of each tar: its name without extension, or its path below the common folder when
    two tars share a name (keys must be unique across the output)."""
    def stem(p: str) -> str:
        base = posixpath.basename(p)
        for ext in (".tar.gz", ".tgz", ".tar"):
            if base.endswith(ext):
                return base[: -len(ext)]
        return base

    stems = [stem(p) for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    dirs = [posixpath.dirname(p) + "/" for p in paths]
    common = os.path.commonprefix(dirs)
    common = common[: common.rfind("/") + 1]  # whole folder names only
    return [d[len(common):] + s for d, s in zip(dirs, stems)]


def captions_of(files: dict[str, bytes]) -> tuple[bytes | str, ...]:
    if "txt" in files:
        return (files["txt"],)
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except (ValueError, UnicodeDecodeError):
            return ()
        cap = meta.get("caption") if isinstance(meta, dict) else None
        if isinstance(cap, str):
            return (cap,)
    return ()


@contextlib.contextmanager
def decompressed(f: BinaryIO) -> Iterator[BinaryIO]:
    """gzip through ``gzip.GzipFile``, whose reads are bounded: tarfile's own stream decompresses a
    whole read block at once, megabytes of output for a block of a highly compressible member."""
    head = f.read(2)
    f.seek(0)
    if head != b"\x1f\x8b":
        yield f
        return
    with gzip.GzipFile(fileobj=f, mode="rb") as gz:
        yield gz


def _end_of(member: tarfile.TarInfo) -> int:
    """Offset just past the member's data, where the next header starts (tar pads to 512 bytes)."""
    return member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def member_groups(stream: BinaryIO, path: str, stats: ShardStats, read: Callable[[tarfile.TarFile, tarfile.TarInfo], Any],
                  base: int = 0) -> Iterator[tuple[str, dict[str, Any], int, int]]:
    """The examples of a tar stream, grouped by key as webdataset groups them:
    ``(key, {ext: read(tar, member)}, start, end)`` with ``[start, end)`` the group's bytes
    (headers included) in the uncompressed tar, ``stream`` being positioned at ``base``.

    Unsafe members (absolute, ``..``, links, devices) are skipped and counted. When the tar
    is damaged, the group read so far is yielded before the error is raised again.
    """
    current, files, start, end = None, {}, 0, 0
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if member.isdir():
                    continue
                if is_unsafe_member(member.name) or not member.isfile():  # links/devices are unsafe too
                    stats.skip(member.name, path, "unsafe_member")
                    continue
                key, ext = _split_key(member.name)
                if key != current or ext in files:  # a repeated member name starts a (duplicate) example
                    if current is not None:
                        yield current, files, start, end
                    current, files, start = key, {}, base + member.offset
                files[ext] = read(tar, member)
                end = base + _end_of(member)
    except (tarfile.TarError, OSError, EOFError):
        if current is not None and files:
            yield current, files, start, end
        raise
    if current is not None:
        yield current, files, start, end


class _TooLarge(str):
    """A member's value when it is over ``max_bytes``: why, instead of its bytes."""


def tar_items(path: str, tag: str, max_bytes: int, stats: ShardStats) -> Iterator[Item]:
    """Streams one tar: one ``Item`` per key. Unsafe members (absolute, ``..``, links, devices) are
    skipped and counted; a member over ``max_bytes`` is never read and its example is skipped
    (``too_large``); a key seen earlier in the tar is skipped (``duplicate_key``)."""
    seen: set[str] = set()

    def read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
        if member.size > max_bytes:
            return _TooLarge(f"{member.name}: {member.size} bytes > {max_bytes}")  # the stream skips the unread data
        m = tar.extractfile(member)
        return m.read() if m is not None else b""

    def item(key: str, files: dict[str, bytes]) -> Item:
        full = f"{tag}/{key}"
        skip = None
        oversize = next((v for v in files.values() if isinstance(v, _TooLarge)), "")
        if key in seen:
            skip = ("duplicate_key", "key appears again later in the tar")
        elif oversize:
            skip = ("too_large", str(oversize))
        seen.add(key)
        files = {ext: b"" if isinstance(v, _TooLarge) else v for ext, v in files.items()}
        image = next((files[e] for e in IMAGE_EXTS if e in files), None)
        return Item(key=full, captions=captions_of(files), image=image, skip=skip, origin=f"{path}:{key}")

    try:
        with epath.Path(path).open("rb") as f, decompressed(f) as stream:
            for key, files, _, _ in member_groups(stream, path, stats, read):
                yield item(key, files)
    except (tarfile.TarError, OSError, EOFError) as e:
        # A truncated tar keeps what was read before the damage; the rest is unknowable.
        print(f"warning: {path}: tar stream ends early ({e}); kept the examples before it", file=sys.stderr)
        stats.skip(tag, path, "truncated_tar", str(e))
