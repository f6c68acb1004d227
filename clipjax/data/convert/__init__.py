"""Converters from image-text collections into clipjax ArrayRecord shards.

Sources:
  csv     OpenCLIP-style CSV/TSV: an image path column, a caption column and optionally
          a label column; rows with the same image path become one example.
  coco    COCO-captions JSON (``images``: id/file_name, ``annotations``: image_id/caption,
          optional ``categories`` + ``category_id`` for labels) plus the image folder.
  folder  ``root/<class>/<image>``: captions from a template, labels from folder names.
  wds     WebDataset tars as written by img2dataset; one output shard per input tar.

Every image is fully decoded once (``images.prepare``): usable odd images are re-encoded
to JPEG, broken ones skipped and counted by reason (``example.make_example``, shared by
every runner). Output shard ``i`` always holds the same inputs (``shards``); finished
shards are never rewritten, so an interrupted run resumes by running the same command
again, and a run with other inputs or options is refused unless ``overwrite``
(``fingerprint``). ``runner=`` runs the shard tasks as an Apache Beam pipeline
(``beam``) with the same output.
"""

from __future__ import annotations

from typing import Any, Sequence

from clipjax.data.convert import inputs
from clipjax.data.convert.driver import report, run
from clipjax.data.convert.example import REASONS, Item, ShardStats, make_example
from clipjax.data.convert.labels import CLASSES_FILE, ClassNames
from clipjax.data.convert.options import ConvertError, ConvertOptions
from clipjax.data.convert.shards import ShardTask
from clipjax.data.convert.tars import is_unsafe_member, tar_paths, tar_tags

__all__ = ["ConvertOptions", "ConvertError", "convert_csv", "convert_coco", "convert_folder", "convert_wds",
           "is_unsafe_member", "report", "REASONS", "CLASSES_FILE", "Item", "ShardStats", "make_example"]


def _listed_tasks(items: list[Item], opts: ConvertOptions) -> list[ShardTask]:
    """Shard i holds items i*per .. (i+1)*per-1 of the listing."""
    if opts.examples_per_shard < 1:
        raise ConvertError("--examples_per_shard must be >= 1")
    per = opts.examples_per_shard
    n = max(1, -(-len(items) // per))
    return [ShardTask(i, n, items=tuple(items[i * per: (i + 1) * per])) for i in range(n)]


def _convert_listed(items: list[Item], ident: dict[str, Any], classes: ClassNames, opts: ConvertOptions,
                    source: str, extra: dict[str, Any], runner: str | None, beam_args: Sequence[str]) -> dict[str, Any]:
    fp = {"inputs": ident, "source_options": dict(extra, examples_per_shard=opts.examples_per_shard),
          "classes": classes.used(it.label for it in items)}
    return run(_listed_tasks(items, opts), opts, source, fp, classes=classes, runner=runner, beam_args=beam_args)


def convert_csv(csv_path: str, opts: ConvertOptions, *, img_key: str = "filepath", caption_key: str = "title",
                sep: str | None = None, label_column: str | None = None, classes_file: str | None = None,
                regions_column: str | None = None, runner: str | None = None,
                beam_args: Sequence[str] = ()) -> dict[str, Any]:
    """CSV/TSV -> shards; ``label_column`` holds int labels or class names (then mapped through
    ``<out>/classes.txt``); ``regions_column`` holds JSON regions (``inputs.parse_regions``).
    Returns the summary."""
    classes = ClassNames(opts.out_dir, classes_file)
    items, ident = inputs.csv_items(csv_path, img_key=img_key, caption_key=caption_key, sep=sep,
                                    label_column=label_column, classes=classes, regions_column=regions_column)
    extra = {"img_key": img_key, "caption_key": caption_key, "sep": sep, "label_column": label_column}
    if regions_column:  # only when set: fingerprints of earlier conversions stay valid
        extra["regions_column"] = regions_column
    return _convert_listed(items, ident, classes, opts, f"csv:{csv_path}", extra, runner, beam_args)


def convert_coco(json_path: str, image_dir: str, opts: ConvertOptions, *, classes_file: str | None = None,
                 instances: str | None = None, runner: str | None = None,
                 beam_args: Sequence[str] = ()) -> dict[str, Any]:
    """COCO-captions JSON + image folder -> shards, one example per image (by id), with the instance
    boxes of ``instances`` (e.g. instances_train2017.json) as regions. Returns the summary."""
    classes = ClassNames(opts.out_dir, classes_file)
    items, ident = inputs.coco_items(json_path, image_dir, classes, instances)
    return _convert_listed(items, ident, classes, opts, f"coco:{json_path}", {}, runner, beam_args)


def convert_folder(root: str, opts: ConvertOptions, *, caption_template: str = "a photo of a {}.",
                   classes_file: str | None = None, runner: str | None = None,
                   beam_args: Sequence[str] = ()) -> dict[str, Any]:
    """``root/<class>/<image>`` -> shards labelled by class folder. Returns the summary."""
    classes = ClassNames(opts.out_dir, classes_file)
    items, ident = inputs.folder_items(root, caption_template, classes)
    return _convert_listed(items, ident, classes, opts, f"folder:{root}", {"caption_template": caption_template},
                           runner, beam_args)


def convert_wds(tars: Sequence[str], opts: ConvertOptions, *, runner: str | None = None,
                beam_args: Sequence[str] = ()) -> dict[str, Any]:
    """WebDataset tars -> shards, output shard i from the i-th input tar (sorted). Returns the summary."""
    from etils import epath

    paths = tar_paths(tars)
    tags = tar_tags(paths)
    tasks = [ShardTask(i, len(paths), tar=p, tag=t) for i, (p, t) in enumerate(zip(paths, tags))]
    ident = {"tars": [[t, epath.Path(p).stat().length] for p, t in zip(paths, tags)]}
    return run(tasks, opts, "wds", {"inputs": ident}, runner=runner, beam_args=beam_args)
