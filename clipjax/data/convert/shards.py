"""One output shard: its task, its files, and writing it atomically.

Output shard ``i`` of ``n`` is ``<out>/<split>-{i:05d}-of-{n:05d}.array_record``; its task
is fixed by the inputs alone (examples ``i*per .. (i+1)*per-1`` of a CSV/COCO/folder
listing, or the ``i``-th tar in sorted order), so every runner and worker count writes
the same records, keys and shard assignment. A shard and its statistics file
(``<out>/_stats/<shard>.json``) are written under temporary names and renamed when
complete: the statistics first, then the shard, so a shard under its final name is whole
and has its counts. A task that fails or is retried leaves at most temporary files,
which the next run (and the end of this one) removes.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Iterator

from etils import epath

from clipjax.atomic import atomic_path, write_text
from clipjax.data import records
from clipjax.data.convert.example import Item, ShardStats, make_example
from clipjax.data.convert.options import ConvertOptions
from clipjax.data.convert.tars import tar_items

STATS_DIR = "_stats"


@dataclass(frozen=True)
class ShardTask:
    """The inputs of one output shard: listed items (csv/coco/folder) or one tar."""

    index: int
    count: int
    items: tuple[Item, ...] = ()
    tar: str = ""
    tag: str = ""  # key prefix of the tar's examples


def shard_path(opts: ConvertOptions, index: int, count: int) -> str:
    return os.path.join(opts.out_dir, records.shard_name(opts.split, index, count))


def stats_path(opts: ConvertOptions, index: int, count: int) -> str:
    return os.path.join(opts.out_dir, STATS_DIR, records.shard_name(opts.split, index, count) + ".json")


def is_done(opts: ConvertOptions, task: ShardTask) -> bool:
    return all(epath.Path(p).exists() for p in (shard_path(opts, task.index, task.count),
                                                stats_path(opts, task.index, task.count)))


def read_stats(opts: ConvertOptions, task: ShardTask) -> ShardStats:
    return ShardStats.from_json(json.loads(epath.Path(stats_path(opts, task.index, task.count)).read_text()))


def split_files(opts: ConvertOptions, *, temporary_only: bool = False) -> list[epath.Path]:
    """This split's shards, statistics and temporary files in the output folder."""
    out = epath.Path(opts.out_dir)
    pattern = f"{opts.split}-?????-of-?????.array_record"
    found = list(out.glob(pattern + ".tmp*")) + list((out / STATS_DIR).glob(pattern + ".json.tmp*"))
    if not temporary_only:
        found += list(out.glob(pattern)) + list((out / STATS_DIR).glob(pattern + ".json"))
    return sorted(found)


def task_examples(task: ShardTask, opts: ConvertOptions, stats: ShardStats) -> Iterator[records.Example]:
    items = tar_items(task.tar, task.tag, opts.max_input_bytes, stats) if task.tar else task.items
    for item in items:
        ex = make_example(item, opts, stats)
        if ex is not None:
            yield ex


def run_task(task: ShardTask, opts: ConvertOptions) -> ShardStats:
    """Converts one shard's inputs and writes the shard and its statistics atomically."""
    final = shard_path(opts, task.index, task.count)
    remote = "://" in final
    # ArrayRecord writes local files: a bucket shard is written locally, then copied up under a temporary name.
    local = os.path.join(tempfile.mkdtemp(prefix="clipjax-shard-"), os.path.basename(final)) if remote else final
    stats = ShardStats()
    writer = records.ShardWriter(local)  # writes `local`.tmp.<pid>; renamed to `local` by close()
    try:
        for ex in task_examples(task, opts, stats):
            writer.write(ex)
        write_text(stats_path(opts, task.index, task.count), json.dumps(stats.to_json()))
    except BaseException:
        writer.__exit__(RuntimeError, None, None)  # closes and removes the temporary shard
        raise
    writer.close()
    if remote:
        try:
            with atomic_path(final) as staged:
                epath.Path(local).copy(staged, overwrite=True)
        finally:
            epath.Path(local).unlink(missing_ok=True)
            os.rmdir(os.path.dirname(local))
    return stats
