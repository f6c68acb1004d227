"""Runs a conversion's shard tasks (in this process, a process pool, or Beam) and writes the summary.

The summary ``<out>/<split>-summary.json`` is built from the per-shard statistics files,
so it covers shards written by earlier (interrupted) runs and by any runner alike.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Sequence

from etils import epath

from clipjax.atomic import write_text
from clipjax.data.convert import fingerprint as fingerprint_lib
from clipjax.data.convert.example import ShardStats
from clipjax.data.convert.labels import ClassNames
from clipjax.data.convert.options import ConvertError, ConvertOptions
from clipjax.data.convert.shards import ShardTask, is_done, read_stats, run_task, split_files
from clipjax.lock import FolderBusy, FolderLock

# One conversion at a time per --out: a second one would delete the first's temporary files.
LOCK_FILE = ".convert.lock"


def _run_task(args: tuple[ShardTask, ConvertOptions]) -> None:
    run_task(*args)


def _ignore_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent reports Ctrl-C once; workers finish their shard


def _run_local(todo: list[ShardTask], opts: ConvertOptions) -> None:
    if opts.workers > 1 and len(todo) > 1:
        # spawn, not fork: the caller may hold threads (JAX, grain) that fork would copy mid-state.
        ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=min(opts.workers, len(todo)), mp_context=ctx,
                                   initializer=_ignore_ctrl_c)
        try:
            for _ in pool.map(_run_task, [(t, opts) for t in todo]):
                pass
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)  # shards are written atomically: none is half there
            raise
        pool.shutdown()
    else:
        for t in todo:
            run_task(t, opts)


def _run_beam(todo: list[ShardTask], opts: ConvertOptions, runner: str, beam_args: Sequence[str]) -> dict[str, int]:
    """Runs ``todo`` on Beam; returns its committed metrics, checked against the shards' statistics."""
    from clipjax.data.convert import beam

    metrics = beam.run_tasks(todo, opts, runner, beam_args)
    written = ShardStats()
    for t in todo:
        written.add(read_stats(opts, t))
    expected = {k: v for k, v in beam.metrics_of(written).items() if v}
    if {k: v for k, v in metrics.items() if v} != expected:  # e.g. a runner that reports attempted counts only
        print(f"warning: {runner} metrics {metrics} differ from the shards' statistics {expected}; "
              "the summary uses the statistics", file=sys.stderr)
    return {k: metrics[k] for k in sorted(metrics)}


def run(tasks: Sequence[ShardTask], opts: ConvertOptions, source: str, fingerprint: dict[str, Any], *,
        classes: ClassNames | None = None, runner: str | None = None,
        beam_args: Sequence[str] = ()) -> dict[str, Any]:
    """Writes the shards not yet done (``runner``: a Beam runner name, else this process/a pool),
    then the summary (returned). ``classes`` is written once the output folder is accepted."""
    # The kind only: the inputs' resolved paths are in `fingerprint`, so a relative path typed from
    # another folder still resumes.
    fingerprint = {"source": source.split(":", 1)[0], "options": opts.output_affecting(), **fingerprint}
    lock = FolderLock(os.path.join(opts.out_dir, LOCK_FILE), what=f"--out={opts.out_dir}",
                      fix="wait for that conversion to end, or convert into another --out")
    try:
        lock.acquire()
    except FolderBusy as e:
        raise ConvertError(str(e)) from None
    try:
        return _run_locked(tasks, opts, source, fingerprint, classes, runner, beam_args)
    finally:
        lock.release()


def _run_locked(tasks: Sequence[ShardTask], opts: ConvertOptions, source: str, fingerprint: dict[str, Any],
                classes: ClassNames | None, runner: str | None, beam_args: Sequence[str]) -> dict[str, Any]:
    fingerprint_lib.prepare_output(opts, fingerprint)
    if classes is not None:
        classes.write()
    for stale in split_files(opts, temporary_only=True):  # left by an interrupted or failed run
        stale.unlink(missing_ok=True)
    t0 = time.time()
    todo = [t for t in tasks if not is_done(opts, t)]
    metrics = None
    if runner:
        metrics = _run_beam(todo, opts, runner, beam_args)
    else:
        _run_local(todo, opts)
    for stale in split_files(opts, temporary_only=True):  # from retried or duplicated Beam bundles
        stale.unlink(missing_ok=True)
    return _summarise(tasks, opts, source, resumed=len(tasks) - len(todo), seconds=time.time() - t0,
                      runner=runner or "local", classes=len(classes.names) if classes is not None else 0,
                      metrics=metrics)


def _summarise(tasks: Sequence[ShardTask], opts: ConvertOptions, source: str, *, resumed: int, seconds: float,
               runner: str, classes: int, metrics: dict[str, int] | None) -> dict[str, Any]:
    total = ShardStats()
    for t in tasks:
        total.add(read_stats(opts, t))
    skipped = sum(total.skipped.values())
    seen = total.written + skipped
    summary = {
        "source": source, "split": opts.split, "out_dir": opts.out_dir if "://" in opts.out_dir
        else os.path.abspath(opts.out_dir),
        "written": total.written, "labelled": total.labelled, "max_label": total.max_label, "classes": classes,
        "skipped": {r: total.skipped[r] for r in sorted(total.skipped)},
        "skipped_total": skipped, "skip_fraction": skipped / seen if seen else 0.0,
        "reencoded": total.reencoded, "captions_truncated": total.captions_truncated,
        "captions_dropped": total.captions_dropped, "shards": len(tasks), "shards_resumed": resumed,
        "runner": runner, "seconds": round(seconds, 3),
    }
    if metrics is not None:
        summary["beam_metrics"] = metrics  # this run's shards only; the counts above include resumed ones
    summary["ok"] = summary["skip_fraction"] <= opts.max_skip_fraction
    write_text(os.path.join(opts.out_dir, f"{opts.split}-summary.json"), json.dumps(summary, indent=2))
    if opts.skipped_report:
        lines = [json.dumps({"key": k, "input": i, "reason": r, "detail": d}) + "\n"
                 for k, i, r, d in total.skipped_inputs]
        epath.Path(opts.skipped_report).write_text("".join(lines))
    return summary


def report(summary: dict[str, Any], max_skip_fraction: float) -> None:
    """Prints the summary; raises ``ConvertError`` when too much was skipped."""
    print(json.dumps(summary, indent=2))
    if not summary["ok"]:
        raise ConvertError(
            f"skipped {summary['skipped_total']} of {summary['written'] + summary['skipped_total']} inputs "
            f"({summary['skip_fraction']:.1%} > --max_skip_fraction {max_skip_fraction:.1%}): {summary['skipped']}. "
            f"The shards are written; see {summary['out_dir']}/{summary['split']}-summary.json"
        )
