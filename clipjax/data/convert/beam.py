"""The conversion as an Apache Beam pipeline: the same shard tasks, distributed.

The driver writes each unfinished shard's task (its listed items, or its tar) to
``<out>/_stats/<split>.plan/SSSSS.msgpack``, so the pipeline graph stays small however
many inputs there are; the pipeline reads the task names, spreads them over the workers
(``Reshuffle``), and each worker runs ``shards.run_task`` on its tasks, exactly as the
single-process path does. A task is one output shard (a tar, a CSV row range, a range of
COCO images or folder files): no shuffle of examples, and a retried bundle rewrites one
whole shard under a temporary name. Counts are also reported as Beam metrics
(namespace ``clipjax.convert``) for the runner's monitoring; the summary is built from
the shards' statistics files like every other run.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Sequence

import msgpack
from etils import epath

from clipjax.data.convert.example import Item, ShardStats
from clipjax.data.convert.options import ConvertError, ConvertOptions
from clipjax.data.convert.shards import STATS_DIR, ShardTask, run_task

NAMESPACE = "clipjax.convert"
COUNTS = ("written", "labelled", "reencoded", "captions_truncated", "captions_dropped")


# --------------------------------------------------------------------------- task files
def _caption(c: bytes | str) -> list:
    # msgpack strings must be valid UTF-8; JSON captions may hold lone surrogates, CSV ones any bytes.
    return [0, c] if isinstance(c, bytes) else [1, c.encode("utf-8", "surrogatepass")]


def _uncaption(c: list) -> bytes | str:
    return c[1] if c[0] == 0 else c[1].decode("utf-8", "surrogatepass")


def encode_task(task: ShardTask) -> bytes:
    items = [[it.key, [_caption(c) for c in it.captions], it.image_path, it.image, it.label,
              list(it.skip) if it.skip else None, it.origin, list(it.regions)] for it in task.items]
    return msgpack.packb([task.index, task.count, task.tar, task.tag, items], use_bin_type=True)


def decode_task(data: bytes) -> ShardTask:
    index, count, tar, tag, items = msgpack.unpackb(data, raw=False)
    return ShardTask(index, count, tar=tar, tag=tag, items=tuple(
        Item(key=k, captions=tuple(_uncaption(c) for c in caps), image_path=path, image=image, label=label,
             skip=tuple(skip) if skip else None, origin=origin, regions=tuple(regions))
        for k, caps, path, image, label, skip, origin, regions in items))


def plan_dir(opts: ConvertOptions) -> str:
    return os.path.join(opts.out_dir, STATS_DIR, f"{opts.split}.plan")


# --------------------------------------------------------------------------- pipeline
def _beam():
    try:
        import apache_beam
    except ImportError:
        raise ConvertError("--runner needs Apache Beam: pip install 'clipjax[beam]' (or drop --runner to convert "
                           "in this process)") from None
    return apache_beam


def _convert_shard_fn(opts: ConvertOptions):
    beam = _beam()

    class ConvertShard(beam.DoFn):
        """Runs one shard task; reports its counts as Beam metrics."""

        def process(self, task_path: str):
            stats = run_task(decode_task(epath.Path(task_path).read_bytes()), opts)
            for name in COUNTS:
                beam.metrics.Metrics.counter(NAMESPACE, name).inc(getattr(stats, name))
            for reason, n in stats.skipped.items():
                beam.metrics.Metrics.counter(NAMESPACE, f"skipped/{reason}").inc(n)
            yield task_path

    return ConvertShard()


def pipeline_options(runner: str, beam_args: Sequence[str]):
    """Beam options from the command line. DirectRunner with several workers runs them as processes
    (image decoding holds the GIL) and its workers log warnings only, unless the options say otherwise."""
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

    args = [f"--runner={runner}", *beam_args]
    if runner in ("DirectRunner", "direct"):
        given = {a.split("=", 1)[0] for a in beam_args}
        if PipelineOptions(args).view_as(DirectOptions).direct_num_workers != 1 \
                and "--direct_running_mode" not in given:
            args.append("--direct_running_mode=multi_processing")
        if "--default_sdk_harness_log_level" not in given:
            args.append("--default_sdk_harness_log_level=WARNING")
    return PipelineOptions(args)


def run_tasks(todo: Sequence[ShardTask], opts: ConvertOptions, runner: str, beam_args: Sequence[str]) -> dict[str, Any]:
    """Runs ``todo`` on the Beam ``runner``; returns the committed metrics (counts and skips by reason)."""
    beam = _beam()
    if not todo:
        return {}
    folder = epath.Path(plan_dir(opts))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for t in todo:
        p = folder / f"{t.index:05d}.msgpack"
        p.write_bytes(encode_task(t))
        paths.append(os.fspath(p))
    from apache_beam.metrics.metric import MetricsFilter

    p = beam.Pipeline(options=pipeline_options(runner, beam_args))
    _ = (p | "Tasks" >> beam.Create(paths) | "Spread" >> beam.Reshuffle()
         | "ConvertShard" >> beam.ParDo(_convert_shard_fn(opts)))
    try:
        result = p.run()
        result.wait_until_finish()
    except Exception as e:
        raise ConvertError(f"the {runner} pipeline failed ({type(e).__name__}: {str(e).strip()[:300]}); complete "
                           "shards are kept: rerun the same command to finish the rest") from e
    folder.rmtree(missing_ok=True)
    metrics = Counter()
    for c in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        metrics[c.key.metric.name] += c.committed
    return dict(metrics)


def metrics_of(stats: ShardStats) -> dict[str, int]:
    """What ``run_tasks`` reports for shards with these statistics (the driver checks they agree)."""
    out = {name: getattr(stats, name) for name in COUNTS}
    out.update({f"skipped/{r}": n for r, n in stats.skipped.items()})
    return out

