"""Webdataset tar shards read in place (local or any epath/fsspec URL): listing, ranged
reads with retries, the per-shard index, and the random-access source.

An example is a group of tar members sharing a key (``convert/tars.member_groups``, the
converters' grouping and member-safety rules). Its address is ``(shard, start, end)``,
the group's byte span, so one ranged read fetches it whole, in either reading mode.

Random access (``data.webdataset.mode=random``): each shard's spans are listed once
(in parallel threads) into a small JSON index, stored beside local shards or in a
cache folder (``data.webdataset.index_dir``); ``WebDatasetExamples`` is then a
sequence like the ArrayRecord source, so the train stream's global shuffle, process
split and resume apply unchanged. Streaming mode lives in ``webdataset_stream.py``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import sys
import tarfile
import time
from typing import Any, BinaryIO, Callable, Iterator, Sequence, TypeVar

import numpy as np
from etils import epath

from clipjax.atomic import write_text
from clipjax.data.captions import BadCaption, clean_caption_info
from clipjax.data.convert import tars
from clipjax.data.convert.example import ShardStats
from clipjax.errors import UserError

log = logging.getLogger("clipjax")

INDEX_VERSION = 1
_INDEX_THREADS = 16  # shards indexed at once: the work is waiting on reads
_T = TypeVar("_T")


class WebDatasetError(UserError, RuntimeError):
    """The shards cannot be used as given (none found, none readable, compressed for random access)."""


class ShardUnreadable(ValueError):
    """A shard (or a span of it) stayed unreadable after the retries; the example is skipped."""


# ---------------------------------------------------------------- listing


def _expand_braces(pattern: str) -> list[str]:
    """Bash-style braces, as webdataset expands them: ``{000..012}`` (zero padding kept) and ``{a,b}``."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        width = len(r.group(1)) if r.group(1).startswith("0") else 0
        options = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        options = body.split(",")
    return [s for opt in options for s in _expand_braces(head + opt + tail)]


def shard_paths(spec: str | Sequence[str]) -> list[str]:
    """The tar shards of ``data.path``: brace ranges, globs, folders and plain paths, given as
    a list or one string separated by ``::`` or whitespace; sorted, deduplicated.

    Plain names are not checked here (a bucket of 40k shards would take 40k requests): a
    missing one is skipped and counted when read, like any unreachable shard.
    """
    parts = [spec] if isinstance(spec, str) else list(spec)
    names = [n for p in parts for n in re.split(r"::|\s+", p) if n]
    paths: list[str] = []
    for name in names:
        for p in _expand_braces(name):
            if any(ch in p for ch in "*?[") or not p.endswith(tars.TAR_SUFFIXES):
                paths += tars.tar_paths([p])  # the converters' listing (globs, folders of *.tar)
            else:
                paths.append(p)
    paths = sorted(set(paths))
    if not paths:
        raise WebDatasetError(f"config.data.path={spec!r} names no tar shards; give e.g. "
                              "'gs://bucket/shards/{00000..00099}.tar', a glob or a folder")
    return paths


# ---------------------------------------------------------------- reads


_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, gzip.BadGzipFile)


def transient(e: BaseException) -> bool:
    """Whether a read error may go away on a retry (network, throttling), unlike damage or absence."""
    return isinstance(e, OSError) and not isinstance(e, _PERMANENT)


def with_retries(fn: Callable[[], _T], what: str, retries: int, delay_s: float) -> _T:
    """``fn()``, retried ``retries`` times after transient errors, waiting ``delay_s`` doubled each time."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except OSError as e:
            if attempt == retries or not transient(e):
                raise
            log.warning("%s: %s; retry %d of %d in %.1f s", what, e, attempt + 1, retries, delay_s * 2**attempt)
            time.sleep(delay_s * 2**attempt)
    raise AssertionError("unreachable")


def read_span(path: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of ``path``: one ranged request on a bucket, one ``pread`` locally."""
    if tars.is_remote(path):
        import fsspec

        fs, _ = fsspec.core.url_to_fs(path)  # fsspec keeps one instance per filesystem
        data = fs.cat_file(path, start=start, end=end)
    else:
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.pread(fd, end - start, start)
        finally:
            os.close(fd)
    if len(data) != end - start:
        raise EOFError(f"{path}: {len(data)} bytes at {start}, expected {end - start} (the shard shrank)")
    return data


@contextlib.contextmanager
def open_tar_stream(path: str, offset: int = 0) -> Iterator[BinaryIO]:
    """The uncompressed tar bytes of ``path`` from ``offset`` on (gzip is decompressed and skipped through)."""
    if tars.is_remote(path):
        import fsspec

        fs, _ = fsspec.core.url_to_fs(path)
        opened = fs.open(path, "rb")  # buffered with read-ahead: few requests for a whole shard
    else:
        opened = open(path, "rb")
    with opened as f, tars.decompressed(f) as stream:
        if offset:
            stream.seek(offset)
        yield stream


def read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    m = tar.extractfile(member)
    return m.read() if m is not None else b""


def parse_group(data: bytes, path: str) -> tuple[str, dict[str, bytes]]:
    """``(key, {ext: bytes})`` of one group's bytes as ``read_span`` returns them."""
    for key, files, _, _ in tars.member_groups(io.BytesIO(data), path, ShardStats(), read_member):
        return key, files
    raise ShardUnreadable(f"{path}: no tar members in the indexed span")


def example_of(files: dict[str, bytes], key: str = "") -> dict[str, Any]:
    """A source item from a group's members: the first image of ``jpg/jpeg/png/webp``, captions
    from ``txt`` (else the ``caption`` of ``json``) cleaned as the converters clean them, label
    from ``cls`` (-1 when absent or not an integer). No image or caption: the pipeline skips it."""
    image = next((files[e] for e in tars.IMAGE_EXTS if e in files), b"")
    captions = []
    for raw in tars.captions_of(files):
        with contextlib.suppress(BadCaption):
            captions.append(clean_caption_info(raw)[0])
    try:
        label = int(files["cls"].decode("ascii").strip()) if "cls" in files else -1
    except ValueError:
        label = -1
    return {"image": image, "captions": captions, "label": label, "key": key}


# ---------------------------------------------------------------- index


def index_path(shard: str, index_dir: str) -> str:
    """Where a shard's index lives: ``index_dir`` (or the cache folder when "") for bucket shards,
    beside local shards when ``index_dir`` is "". Names outside the shard's folder carry a hash
    of its full path, so one cache folder serves every dataset."""
    name = posixpath.basename(shard) + ".idx.json"
    if not index_dir and not tars.is_remote(shard) and os.access(os.path.dirname(os.path.abspath(shard)), os.W_OK):
        return os.path.abspath(shard) + ".idx.json"
    folder = index_dir or default_index_dir()
    return f"{folder.rstrip('/')}/{hashlib.sha256(shard.encode()).hexdigest()[:12]}-{name}"


def default_index_dir() -> str:
    root = os.environ.get("CLIPJAX_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "clipjax")
    return os.path.join(root, "webdataset-index")


def build_index(shard: str, retries: int, delay_s: float) -> dict[str, Any]:
    """Reads a shard once and lists its groups' spans. A damaged shard keeps the groups before
    the damage (``damaged`` says why); an unreadable one raises ``ShardUnreadable``."""
    starts: list[int] = []
    ends: list[int] = []
    damaged = ""

    def scan() -> None:
        nonlocal damaged
        starts.clear(), ends.clear()
        with open_tar_stream(shard) as stream:
            if isinstance(stream, gzip.GzipFile):
                raise WebDatasetError(f"{shard}: compressed shards cannot be read at random; set "
                                      "config.data.webdataset.mode=stream or decompress them")
            try:
                for _, _, start, end in tars.member_groups(stream, shard, ShardStats(), read_member):
                    starts.append(start), ends.append(end)
            except (tarfile.TarError, EOFError) as e:
                damaged = str(e) or type(e).__name__

    try:
        with_retries(scan, f"indexing {shard}", retries, delay_s)
    except OSError as e:
        raise ShardUnreadable(f"{shard}: {e}") from None
    return {"version": INDEX_VERSION, "shard": shard, "starts": starts, "ends": ends, "damaged": damaged}


def load_or_build_index(shard: str, index_dir: str, retries: int, delay_s: float) -> dict[str, Any]:
    """The shard's index, built and stored (atomically: concurrent builders write identical
    bytes, the last rename wins) when absent. Shards are assumed never to change."""
    path = index_path(shard, index_dir)
    p = epath.Path(path)
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
        index = json.loads(p.read_text())
        if index["version"] == INDEX_VERSION and index["shard"] == shard:
            return index
    index = build_index(shard, retries, delay_s)
    write_text(path, json.dumps(index, separators=(",", ":")))
    return index


def load_indexes(shards: Sequence[str], index_dir: str, retries: int, delay_s: float,
                 threads: int = _INDEX_THREADS, process: tuple[int, int] = (0, 1)) -> list[dict[str, Any] | None]:
    """Every shard's index (None for an unreachable shard), loaded or built in parallel.

    Process ``i`` of ``n`` takes shards ``i::n`` first: with a shared ``index_dir``, the
    hosts of a pod build one share each and find the others' indexes written when they
    come to them (a late one is built twice, identically). No host waits for another.
    """
    def one(k: int) -> dict[str, Any] | None:
        try:
            return load_or_build_index(shards[k], index_dir, retries, delay_s)
        except ShardUnreadable as e:
            return {"unreadable": str(e)}

    i, n = process
    order = [k for r in range(n) for k in range((i + r) % n, len(shards), n)]
    with concurrent.futures.ThreadPoolExecutor(min(threads, len(shards))) as pool:
        found = dict(zip(order, pool.map(one, order)))  # map starts the work in this order
    found = [found[k] for k in range(len(shards))]
    out: list[dict[str, Any] | None] = []
    for shard, index in zip(shards, found):
        if "unreadable" in index:
            log.warning("webdataset: skipping unreachable shard %s", index["unreadable"])
            out.append(None)
            continue
        if index["damaged"]:
            log.warning("webdataset: %s is damaged (%s); using its %d examples before the damage", shard,
                        index["damaged"], len(index["starts"]))
        out.append(index)
    return out


# ---------------------------------------------------------------- random-access source


def _process_slot() -> tuple[int, int]:
    """jax's (process index, count) when jax is in use, else (0, 1): no jax import for tools."""
    jax = sys.modules.get("jax")
    return (jax.process_index(), jax.process_count()) if jax is not None else (0, 1)


class WebDatasetExamples:
    """The examples of webdataset shards by global index, through their indexes (picklable).

    Example ``i`` is the ``j``-th group of shard ``s`` (shards in sorted order, groups in
    tar order), the order the converter writes them in. Skipped shards (unreachable, or
    damaged: those keep the examples before the damage) are counted in ``num_skipped_shards``.
    """

    def __init__(self, spec: str | Sequence[str], *, index_dir: str = "", retries: int = 3,
                 retry_delay_s: float = 1.0):
        self.shards = shard_paths(spec)
        self.tags = tars.tar_tags(self.shards)  # key prefixes, as the converter writes them
        self.retries, self.retry_delay_s = int(retries), float(retry_delay_s)
        indexes = load_indexes(self.shards, index_dir, self.retries, self.retry_delay_s, process=_process_slot())
        self.num_skipped_shards = sum(1 for x in indexes if x is None or x["damaged"])
        empty = {"starts": [], "ends": []}
        self.starts = [np.asarray((x or empty)["starts"], np.int64) for x in indexes]
        self.ends = [np.asarray((x or empty)["ends"], np.int64) for x in indexes]
        self.offsets = np.cumsum([0] + [len(s) for s in self.starts])
        if self.offsets[-1] == 0:
            raise WebDatasetError(f"no readable examples in the {len(self.shards)} shard(s) of {spec!r} "
                                  f"(first: {self.shards[0]}); check config.data.path")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def address(self, index: int) -> tuple[int, int, int]:
        """``(shard, start, end)`` of example ``index``."""
        s = int(np.searchsorted(self.offsets, index, side="right")) - 1
        j = index - int(self.offsets[s])
        return s, int(self.starts[s][j]), int(self.ends[s][j])

    def read(self, shard: int, start: int, end: int) -> dict[str, Any]:
        path = self.shards[shard]
        try:
            data = with_retries(lambda: read_span(path, start, end), f"reading {path}", self.retries,
                                self.retry_delay_s)
            key, files = parse_group(data, path)
        except (OSError, EOFError, tarfile.TarError) as e:
            raise ShardUnreadable(f"{path}@{start}: {e}") from None
        return example_of(files, f"{self.tags[shard]}/{key}")

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.read(*self.address(int(index)))

    def __repr__(self) -> str:
        return f"WebDatasetExamples({len(self.shards)} shards from {self.shards[0]!r}, {len(self)} examples)"

