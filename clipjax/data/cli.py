"""``clipjax-data``: convert image-text data into ArrayRecord shards, or write the synthetic set.

  clipjax-data convert csv    --csv FILE --out DIR [--img_key filepath --caption_key title --label_column COL
                                                --regions_column COL]
  clipjax-data convert coco   --json FILE --images DIR --out DIR [--instances FILE]
  clipjax-data convert folder ROOT --out DIR [--caption_template "a photo of a {}."]
  clipjax-data convert wds    --tars TAR|GLOB|DIR [...] --out DIR
  clipjax-data synth --out DIR [--num_train N --num_heldout M --image_size S --seed K ...]

Add --runner=NAME to run a conversion as an Apache Beam pipeline (pip install clipjax[beam]);
other --flags after it are Beam pipeline options (e.g. --direct_num_workers=4, --project=...).
"""

from __future__ import annotations

import argparse
import sys

from clipjax.data.captions import MAX_CHARS
from clipjax.data.convert.options import MAX_INPUT_BYTES
from clipjax.errors import ArgumentParser, UserError, run_cli


def _common(p: argparse.ArgumentParser, per_shard: bool = True) -> None:
    p.add_argument("--out", required=True, help="output folder (or bucket path) for shards, _stats/ and "
                                                "<split>-summary.json")
    p.add_argument("--split", default="train", help="split name in the shard file names (default train)")
    if per_shard:
        p.add_argument("--examples_per_shard", type=int, default=5000, help="examples per output shard (default 5000)")
    p.add_argument("--max_side", type=int, default=None,
                   help="re-encode images whose longer side exceeds this to JPEG of that size (default: keep size)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    p.add_argument("--max_caption_chars", type=int, default=MAX_CHARS,
                   help=f"longer captions are cut at a word boundary (default {MAX_CHARS})")
    p.add_argument("--max_input_bytes", type=int, default=MAX_INPUT_BYTES,
                   help=f"image files / tar members larger than this are skipped unread (default {MAX_INPUT_BYTES})")
    p.add_argument("--workers", type=int, default=1, help="parallel processes, one output shard each (default 1)")
    p.add_argument("--max_skip_fraction", type=float, default=0.1,
                   help="exit with an error when a larger fraction of inputs is skipped (default 0.1)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete this split in --out and convert anew (needed when inputs or options changed)")
    p.add_argument("--skipped_report", default=None, metavar="FILE",
                   help="write one JSON line per skipped input (key, input, reason, detail) to FILE")
    p.add_argument("--runner", default=None, help="run as an Apache Beam pipeline on this runner (DirectRunner, "
                                                  "DataflowRunner, FlinkRunner, SparkRunner, ...)")


def _classes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", default=None, metavar="FILE",
                   help="class names, one a line in label order (default: from the data, written to <out>/classes.txt)")


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="clipjax-data", doc=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert csv / coco / folder / webdataset sources into ArrayRecord shards")
    kinds = conv.add_subparsers(dest="source", required=True)

    c = kinds.add_parser("csv", help="OpenCLIP-style CSV/TSV of image paths, captions and optional labels")
    c.add_argument("--csv", required=True, help="CSV/TSV file; relative image paths are resolved against its folder")
    c.add_argument("--img_key", default="filepath", help="image path column (default filepath)")
    c.add_argument("--caption_key", default="title", help="caption column (default title)")
    c.add_argument("--label_column", default=None,
                   help="label column: integer labels, or class names (mapped through <out>/classes.txt)")
    c.add_argument("--sep", default=None, help="column separator (default: tab for .tsv, comma otherwise)")
    c.add_argument("--regions_column", default=None,
                   help='JSON regions column: [{"box": [x0, y0, x1, y1] (image fractions), "text": "..."}]')
    _classes(c)
    _common(c)

    o = kinds.add_parser("coco", help="COCO captions JSON plus its image folder (labels from 'categories' if present)")
    o.add_argument("--json", required=True, help="e.g. annotations/captions_train2017.json")
    o.add_argument("--images", required=True, help="folder holding the images' file_name paths")
    o.add_argument("--instances", default=None,
                   help="COCO instances JSON (e.g. instances_train2017.json): its boxes, named by category, "
                        "become each image's regions")
    _classes(o)
    _common(o)

    f = kinds.add_parser("folder", help="ROOT/<class>/<image>: labels from folder names, captions from a template")
    f.add_argument("root", help="folder holding one sub-folder per class")
    f.add_argument("--caption_template", default="a photo of a {}.",
                   help="caption of every image, {} = class folder name with _ as spaces (default 'a photo of a {}.')")
    _classes(f)
    _common(f)

    w = kinds.add_parser("wds", help="WebDataset tars (img2dataset output); one output shard per tar")
    w.add_argument("--tars", required=True, nargs="+", help="tar files, globs or folders of *.tar")
    _common(w, per_shard=False)

    from clipjax.data.config import synth_config

    d = synth_config()
    s = sub.add_parser("synth", help="write the synthetic shapes dataset")
    s.add_argument("--out", required=True, help="folder to write the shards and info.json into")
    for key in ("num_train", "num_heldout", "image_size", "seed", "num_train_shards", "jpeg_quality"):
        s.add_argument(f"--{key}", type=int, default=d[key], help=f"default {d[key]}")
    return p


def _synth(a: argparse.Namespace) -> int:
    from clipjax.data import synth
    from clipjax.data.config import synth_config, validate_synth_config

    cfg = synth_config()
    cfg.update({k: getattr(a, k) for k in cfg})
    try:
        validate_synth_config(cfg, prefix="--")
    except ValueError as e:
        raise UserError(f"{e} (see clipjax-data synth --help)") from e
    existed = synth.load_info(a.out) is not None
    info = synth.ensure_synthetic(a.out, cfg)
    print(f"{'already complete' if existed else 'wrote'}: {a.out} ({info['splits'][synth.SPLIT_TRAIN]['num_examples']} "
          f"train, {info['splits'][synth.SPLIT_HELDOUT]['num_examples']} heldout, {len(synth.CLASSES)} classes)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 with one line on stderr for a user error)."""
    return run_cli("clipjax-data", _main, argv)


def _main(argv: list[str]) -> int:
    parser = _parser()
    if any(x == "--runner" or x.startswith("--runner=") for x in argv):
        a, beam_args = parser.parse_known_args(argv)  # the flags clipjax does not know are Beam's
    else:
        a, beam_args = parser.parse_args(argv), []
    if a.command == "synth":
        return _synth(a)

    from clipjax.data import convert

    opts = convert.ConvertOptions(
        out_dir=a.out, split=a.split, examples_per_shard=getattr(a, "examples_per_shard", 5000), max_side=a.max_side,
        quality=a.quality, max_caption_chars=a.max_caption_chars, max_input_bytes=a.max_input_bytes,
        workers=a.workers, max_skip_fraction=a.max_skip_fraction, overwrite=a.overwrite,
        skipped_report=a.skipped_report,
    )
    run = {"runner": a.runner, "beam_args": beam_args}
    try:
        if a.source == "csv":
            summary = convert.convert_csv(a.csv, opts, img_key=a.img_key, caption_key=a.caption_key, sep=a.sep,
                                          label_column=a.label_column, classes_file=a.classes,
                                          regions_column=a.regions_column, **run)
        elif a.source == "coco":
            summary = convert.convert_coco(a.json, a.images, opts, classes_file=a.classes, instances=a.instances,
                                           **run)
        elif a.source == "folder":
            summary = convert.convert_folder(a.root, opts, caption_template=a.caption_template,
                                             classes_file=a.classes, **run)
        else:
            summary = convert.convert_wds(a.tars, opts, **run)
        convert.report(summary, opts.max_skip_fraction)
    except FileNotFoundError as e:
        raise UserError(f"{e.filename}: no such file or folder") from e
    except ValueError as e:  # malformed inputs
        raise UserError(str(e)) from e
    return 0


if __name__ == "__main__":
    sys.exit(main())
