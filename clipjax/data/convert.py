"""Converters from image-text sources into clipjax ArrayRecord shards.

Sources:
  csv   OpenCLIP-style CSV/TSV: an image path column and a caption column; rows with the
        same image path become one example with several captions.
  coco  COCO-captions JSON (``images``: id/file_name, ``annotations``: image_id/caption)
        plus the image folder; one example per image with all its captions.
  wds   WebDataset tars as written by img2dataset (``KEY.jpg|png|webp`` with ``KEY.txt``
        and/or ``KEY.json`` holding ``caption``); one output shard per input tar.

Every image is fully decoded once (``images.prepare``): usable odd images (CMYK,
gray, palette, alpha, 16-bit, over ``max_side``) are re-encoded to JPEG, broken ones
skipped and counted by reason. Output shard ``i`` always holds the same inputs, and
finished shards are never rewritten, so an interrupted run resumes by running the
same command again. Per-shard statistics live in ``<out>/_stats/`` so the summary
``<out>/<split>-summary.json`` covers resumed shards too.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import multiprocessing
import os
import posixpath
import sys
import tarfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from clipjax.data import records
from clipjax.data.captions import MAX_CHARS, BadCaption, clean_caption_info
from clipjax.data.images import BadImage, prepare
from clipjax.errors import UserError

__all__ = ["ConvertOptions", "ConvertError", "convert_csv", "convert_coco", "convert_wds", "is_unsafe_member"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Skip reasons: per example, except unsafe_member (per tar member) and truncated_tar (per tar).
REASONS = ("missing_image", "bad_image", "no_caption", "bad_caption", "unsafe_member", "truncated_tar")


class ConvertError(UserError, RuntimeError):
    """The conversion cannot proceed or skipped too much; the message says why."""


@dataclass(frozen=True)
class ConvertOptions:
    out_dir: str
    split: str = "train"
    examples_per_shard: int = 5000  # csv/coco; wds keeps one output shard per input tar
    max_side: int | None = None  # re-encode images whose longer side is larger
    quality: int = 90  # JPEG quality of re-encoded images
    max_caption_chars: int = MAX_CHARS
    workers: int = 1
    max_skip_fraction: float = 0.1


@dataclass
class ShardStats:
    written: int = 0
    reencoded: int = 0
    captions_truncated: int = 0
    captions_dropped: int = 0  # invalid captions of examples kept thanks to another caption
    skipped: Counter = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        return {"written": self.written, "reencoded": self.reencoded, "captions_truncated": self.captions_truncated,
                "captions_dropped": self.captions_dropped, "skipped": dict(self.skipped)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ShardStats":
        return cls(d["written"], d["reencoded"], d["captions_truncated"], d["captions_dropped"], Counter(d["skipped"]))


# --------------------------------------------------------------------------- one example
def _captions(raw: Sequence[bytes | str], opts: ConvertOptions, stats: ShardStats) -> tuple[list[str], str | None]:
    """Clean captions, and the skip reason when none is usable."""
    out, reason = [], None
    for c in raw:
        try:
            text, cut = clean_caption_info(c, max_chars=opts.max_caption_chars)
        except BadCaption as e:
            reason = reason or ("no_caption" if "empty" in str(e) else "bad_caption")
            continue
        stats.captions_truncated += int(cut)
        out.append(text)
    if out:
        stats.captions_dropped += len(raw) - len(out)
        return out, None
    return [], reason or "no_caption"


def _example(key: str, image: bytes | None, raw_captions: Sequence[bytes | str], opts: ConvertOptions,
             stats: ShardStats) -> records.Example | None:
    """The record to write, or None with the skip counted."""
    if image is None:
        stats.skipped["missing_image"] += 1
        return None
    captions, reason = _captions(raw_captions, opts, stats)
    if reason:
        stats.skipped[reason] += 1
        return None
    try:
        data, converted = prepare(image, opts.max_side, quality=opts.quality)
    except BadImage:
        stats.skipped["bad_image"] += 1
        return None
    stats.reencoded += int(converted)
    stats.written += 1
    return records.Example(key=key, image=data, captions=captions)


# --------------------------------------------------------------------------- shard writing
def _stats_path(opts: ConvertOptions, shard: str) -> str:
    return os.path.join(opts.out_dir, "_stats", shard + ".json")


def _write_shard(index: int, count: int, examples: Iterator[records.Example | None], stats: ShardStats,
                 opts: ConvertOptions) -> ShardStats:
    """Writes one shard atomically; its stats file is in place before the shard gets its final name."""
    name = records.shard_name(opts.split, index, count)
    path = os.path.join(opts.out_dir, name)
    for stale in glob.glob(glob.escape(path) + ".tmp*"):  # left by an interrupted run
        os.remove(stale)
    writer = records.ShardWriter(path)
    try:
        for ex in examples:
            if ex is not None:
                writer.write(ex)
        stats_file = _stats_path(opts, name)
        os.makedirs(os.path.dirname(stats_file), exist_ok=True)
        with open(stats_file + ".tmp", "w") as f:
            json.dump(stats.to_json(), f)
        os.replace(stats_file + ".tmp", stats_file)
    except BaseException:
        writer.__exit__(RuntimeError, None, None)  # closes and removes the .tmp
        raise
    writer.close()
    return stats


def _read_file(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
        return None


def _files_task(args: tuple[int, int, list[tuple[str, str, list[bytes | str]]], ConvertOptions]) -> ShardStats:
    """Worker: one output shard from (key, image path, captions) items (csv and coco)."""
    index, count, items, opts = args
    stats = ShardStats()
    examples = (_example(key, _read_file(path), caps, opts, stats) for key, path, caps in items)
    return _write_shard(index, count, examples, stats, opts)


# --------------------------------------------------------------------------- webdataset
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


def _wds_captions(files: dict[str, bytes]) -> list[bytes | str]:
    if "txt" in files:
        return [files["txt"]]
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except (ValueError, UnicodeDecodeError):
            return []
        cap = meta.get("caption") if isinstance(meta, dict) else None
        if isinstance(cap, str):
            return [cap]
    return []


def _wds_examples(path: str, opts: ConvertOptions, stats: ShardStats) -> Iterator[records.Example | None]:
    """Streams one tar (never extracted): groups consecutive members by key."""
    tag = os.path.splitext(os.path.basename(path))[0]

    def emit(key: str, files: dict[str, bytes]) -> records.Example | None:
        image = next((files[e] for e in IMAGE_EXTS if e in files), None)
        return _example(f"{tag}/{key}", image, _wds_captions(files), opts, stats)

    current, files = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if member.isdir():
                    continue
                if is_unsafe_member(member.name) or not member.isfile():  # links/devices are unsafe too
                    stats.skipped["unsafe_member"] += 1
                    continue
                key, ext = _split_key(member.name)
                if key != current:
                    if current is not None:
                        yield emit(current, files)
                    current, files = key, {}
                f = tar.extractfile(member)
                files[ext] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        # A truncated tar keeps what was read before the damage; the rest is unknowable.
        print(f"warning: {path}: tar stream ends early ({e}); kept the examples before it", file=sys.stderr)
        stats.skipped["truncated_tar"] += 1
    if current is not None:
        yield emit(current, files)


def _wds_task(args: tuple[int, int, str, ConvertOptions]) -> ShardStats:
    index, count, path, opts = args
    stats = ShardStats()
    return _write_shard(index, count, _wds_examples(path, opts, stats), stats, opts)


# --------------------------------------------------------------------------- driver
def _check_existing(opts: ConvertOptions, count: int) -> None:
    pattern = os.path.join(opts.out_dir, f"{opts.split}-?????-of-?????.array_record")
    other = [p for p in glob.glob(pattern) if not p.endswith(f"-of-{count:05d}.array_record")]
    if other:
        raise ConvertError(
            f"{opts.out_dir} already holds {opts.split} shards of another layout ({os.path.basename(other[0])}); "
            f"this run would write {count} shards. Use a fresh output folder or the original options."
        )


def _run(tasks: list[tuple], fn, opts: ConvertOptions, source: str) -> dict[str, Any]:
    """Runs the unfinished shard tasks (in parallel), then merges all per-shard stats into the summary."""
    count = len(tasks)
    _check_existing(opts, count)
    os.makedirs(opts.out_dir, exist_ok=True)
    t0 = time.time()
    todo, resumed = [], 0
    for t in tasks:
        name = records.shard_name(opts.split, t[0], count)
        done = os.path.exists(os.path.join(opts.out_dir, name)) and os.path.exists(_stats_path(opts, name))
        if done:
            resumed += 1
        else:
            todo.append(t)
    if opts.workers > 1 and len(todo) > 1:
        # spawn, not fork: the caller may hold threads (JAX, grain) that fork would copy mid-state.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(opts.workers, len(todo)), mp_context=ctx) as pool:
            for _ in pool.map(fn, todo):
                pass
    else:
        for t in todo:
            fn(t)

    total = ShardStats()
    for t in tasks:
        with open(_stats_path(opts, records.shard_name(opts.split, t[0], count))) as f:
            s = ShardStats.from_json(json.load(f))
        total.written += s.written
        total.reencoded += s.reencoded
        total.captions_truncated += s.captions_truncated
        total.captions_dropped += s.captions_dropped
        total.skipped.update(s.skipped)
    skipped = sum(total.skipped.values())
    seen = total.written + skipped
    summary = {
        "source": source, "split": opts.split, "out_dir": os.path.abspath(opts.out_dir),
        "written": total.written, "skipped": {r: total.skipped[r] for r in sorted(total.skipped)},
        "skipped_total": skipped, "skip_fraction": skipped / seen if seen else 0.0,
        "reencoded": total.reencoded, "captions_truncated": total.captions_truncated,
        "captions_dropped": total.captions_dropped, "shards": count, "shards_resumed": resumed,
        "seconds": round(time.time() - t0, 3),
    }
    summary["ok"] = summary["skip_fraction"] <= opts.max_skip_fraction
    path = os.path.join(opts.out_dir, f"{opts.split}-summary.json")
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)
    return summary


def _file_tasks(items: list[tuple[str, str, list]], opts: ConvertOptions) -> list[tuple]:
    if opts.examples_per_shard < 1:
        raise ConvertError("examples_per_shard must be >= 1")
    n = max(1, math.ceil(len(items) / opts.examples_per_shard))
    per = opts.examples_per_shard
    return [(i, n, items[i * per : (i + 1) * per], opts) for i in range(n)]


def convert_csv(csv_path: str, opts: ConvertOptions, *, img_key: str = "filepath", caption_key: str = "title",
                sep: str | None = None) -> dict[str, Any]:
    """CSV/TSV -> shards; ``sep`` defaults to tab for .tsv/.tab, comma otherwise. Returns the summary."""
    if sep is None:
        sep = "\t" if csv_path.lower().endswith((".tsv", ".tab", ".tsv.txt")) else ","
    root = os.path.dirname(os.path.abspath(csv_path))
    groups: dict[str, list] = {}
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # huge captions are cut later, not a parse error; restored below
    try:
        # surrogateescape keeps invalid UTF-8 bytes so each caption is judged on its own bytes.
        with open(csv_path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f, delimiter=sep)
            missing = [k for k in (img_key, caption_key) if k not in (reader.fieldnames or [])]
            if missing:
                raise ConvertError(f"{csv_path}: no column(s) {missing}; columns are {reader.fieldnames} "
                                   f"(separator {sep!r}; set --img_key/--caption_key/--sep)")
            for row in reader:
                rel = row.get(img_key) or ""
                cap = row.get(caption_key) or ""
                path = rel if os.path.isabs(rel) else os.path.join(root, rel)
                groups.setdefault(path, [rel, []])[1].append(cap.encode("utf-8", "surrogateescape"))
    finally:
        csv.field_size_limit(old_limit)
    items = [(rel, path, caps) for path, (rel, caps) in groups.items()]  # first-appearance order
    return _run(_file_tasks(items, opts), _files_task, opts, f"csv:{csv_path}")


def convert_coco(json_path: str, image_dir: str, opts: ConvertOptions) -> dict[str, Any]:
    """COCO-captions JSON + image folder -> shards, one example per image (by id). Returns the summary."""
    with open(json_path, "rb") as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or "images" not in meta or "annotations" not in meta:
        raise ConvertError(f"{json_path}: not a COCO captions file (needs 'images' and 'annotations')")
    caps: dict[Any, list[str]] = {}
    for a in meta["annotations"]:
        caps.setdefault(a["image_id"], []).append(a.get("caption") or "")
    items = []
    for im in sorted(meta["images"], key=lambda im: im["id"]):
        items.append((str(im["id"]), os.path.join(image_dir, im["file_name"]), caps.get(im["id"], [])))
    return _run(_file_tasks(items, opts), _files_task, opts, f"coco:{json_path}")


def wds_inputs(inputs: Sequence[str]) -> list[str]:
    """Tar paths from files, globs and folders (all ``*.tar*`` inside), sorted, deduplicated."""
    paths: list[str] = []
    for spec in inputs:
        if os.path.isdir(spec):
            paths += glob.glob(os.path.join(spec, "*.tar")) + glob.glob(os.path.join(spec, "*.tar.gz"))
        elif any(ch in spec for ch in "*?["):
            paths += glob.glob(spec)
        else:
            paths.append(spec)
    paths = sorted(set(paths))
    if not paths:
        raise ConvertError(f"no tar files in {list(inputs)}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ConvertError(f"tar file(s) not found: {missing[:5]}")
    return paths


def convert_wds(inputs: Sequence[str], opts: ConvertOptions) -> dict[str, Any]:
    """WebDataset tars -> shards, output shard i from the i-th input tar (sorted). Returns the summary."""
    paths = wds_inputs(inputs)
    tasks = [(i, len(paths), p, opts) for i, p in enumerate(paths)]
    return _run(tasks, _wds_task, opts, "wds")


def report(summary: dict[str, Any], max_skip_fraction: float) -> None:
    """Prints the summary; raises ``ConvertError`` when too much was skipped."""
    print(json.dumps(summary, indent=2))
    if not summary["ok"]:
        raise ConvertError(
            f"skipped {summary['skipped_total']} of {summary['written'] + summary['skipped_total']} inputs "
            f"({summary['skip_fraction']:.1%} > --max_skip_fraction {max_skip_fraction:.1%}): {summary['skipped']}. "
            f"The shards are written; see {summary['out_dir']}/{summary['split']}-summary.json"
        )
