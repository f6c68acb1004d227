"""``clipjax-data``: convert image-text data into ArrayRecord shards, or write the synthetic set.

  clipjax-data convert csv  --csv FILE --out DIR [--img_key filepath --caption_key title --sep ,]
  clipjax-data convert coco --json FILE --images DIR --out DIR
  clipjax-data convert wds  --tars TAR|GLOB|DIR [...] --out DIR
  clipjax-data synth --out DIR [...]   (see clipjax-data synth --help)
"""

from __future__ import annotations

import argparse
import sys

from clipjax.data.captions import MAX_CHARS
from clipjax.errors import ArgumentParser, UserError, run_cli


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder for shards, _stats/ and <split>-summary.json")
    p.add_argument("--split", default="train", help="split name in the shard file names (default train)")
    p.add_argument("--max_side", type=int, default=None,
                   help="re-encode images whose longer side exceeds this to JPEG of that size (default: keep size)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    p.add_argument("--max_caption_chars", type=int, default=MAX_CHARS,
                   help=f"longer captions are cut at a word boundary (default {MAX_CHARS})")
    p.add_argument("--workers", type=int, default=1, help="parallel processes, one output shard each (default 1)")
    p.add_argument("--max_skip_fraction", type=float, default=0.1,
                   help="exit with an error when a larger fraction of inputs is skipped (default 0.1)")


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="clipjax-data", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    sub = p.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert csv / coco / webdataset sources into ArrayRecord shards")
    kinds = conv.add_subparsers(dest="source", required=True)

    c = kinds.add_parser("csv", help="OpenCLIP-style CSV/TSV of image paths and captions")
    c.add_argument("--csv", required=True, help="CSV/TSV file; relative image paths are resolved against its folder")
    c.add_argument("--img_key", default="filepath", help="image path column (default filepath)")
    c.add_argument("--caption_key", default="title", help="caption column (default title)")
    c.add_argument("--sep", default=None, help="column separator (default: tab for .tsv, comma otherwise)")
    c.add_argument("--examples_per_shard", type=int, default=5000)
    _common(c)

    o = kinds.add_parser("coco", help="COCO captions JSON plus its image folder")
    o.add_argument("--json", required=True, help="e.g. annotations/captions_train2017.json")
    o.add_argument("--images", required=True, help="folder holding the images' file_name paths")
    o.add_argument("--examples_per_shard", type=int, default=5000)
    _common(o)

    w = kinds.add_parser("wds", help="WebDataset tars (img2dataset output); one output shard per tar")
    w.add_argument("--tars", required=True, nargs="+", help="tar files, globs or folders of *.tar")
    _common(w)

    sub.add_parser("synth", help="write the synthetic shapes dataset (arguments: clipjax-data synth --help)",
                   add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 with one line on stderr for a user error)."""
    return run_cli("clipjax-data", _main, argv)


def _main(argv: list[str]) -> int:
    if argv[:1] == ["synth"]:  # the synth command owns its own arguments
        from clipjax.data import synth

        return int(synth.main(argv[1:]) or 0)
    a = _parser().parse_args(argv)

    from clipjax.data import convert

    opts = convert.ConvertOptions(
        out_dir=a.out, split=a.split, examples_per_shard=getattr(a, "examples_per_shard", 5000), max_side=a.max_side,
        quality=a.quality, max_caption_chars=a.max_caption_chars, workers=a.workers,
        max_skip_fraction=a.max_skip_fraction,
    )
    try:
        if a.source == "csv":
            summary = convert.convert_csv(a.csv, opts, img_key=a.img_key, caption_key=a.caption_key, sep=a.sep)
        elif a.source == "coco":
            summary = convert.convert_coco(a.json, a.images, opts)
        else:
            summary = convert.convert_wds(a.tars, opts)
        convert.report(summary, opts.max_skip_fraction)
    except FileNotFoundError as e:
        raise UserError(f"{e.filename}: no such file or folder") from e
    except ValueError as e:  # malformed inputs
        raise UserError(str(e)) from e
    return 0


if __name__ == "__main__":
    sys.exit(main())
