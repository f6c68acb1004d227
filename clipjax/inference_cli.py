"""``clipjax-embed`` and ``clipjax-predict``: a trained model on a folder, a CSV or a shard folder.

  clipjax-embed   --model=RUN_DIR|WEIGHTS SOURCE --out=FILE.npy|FILE.parquet [--texts] [--step=N]
  clipjax-predict --model=RUN_DIR|WEIGHTS SOURCE --classes=a,b,c|FILE [--templates=single] [--out=FILE.csv]

SOURCE: a folder of images, a folder of clipjax shards (--split picks one), a CSV/TSV
(--img_key, --caption_key) or, with --texts, a .txt file of one text a line. The model
is a clipjax run folder (its latest checkpoint, or --step) or a weights file
(OpenCLIP .safetensors/.bin/.pt; --openclip_model names what shapes cannot tell).

clipjax-embed writes FILE.npy (float32 [N, E], L2-normalised) and FILE.keys.txt (the
key of each row, one a line), or FILE.parquet with columns ``key`` and ``embedding``.
clipjax-predict prints ``key<TAB>class<TAB>probability`` per image (or writes the CSV
--out with the top --top_k classes); when every image sits in a folder named after one
of the classes, it also prints the accuracy.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import sys
from typing import Any, Callable

import numpy as np

from clipjax import host_env
from clipjax.errors import ArgumentParser, UserError, run_cli


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="folder of images, folder of clipjax shards, CSV/TSV, or .txt (texts)")
    p.add_argument("--model", required=True, help="clipjax run folder or weights file (OpenCLIP .safetensors/.bin/.pt)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run folder (default: the latest)")
    p.add_argument("--openclip_model", default=None,
                   help="OpenCLIP model name or config JSON for a weights file (e.g. ViT-B-32-quickgelu)")
    p.add_argument("--split", default="", help="split of a shard folder (default: its only split)")
    p.add_argument("--img_key", default="filepath", help="CSV column of image paths (default filepath)")
    p.add_argument("--caption_key", default="title", help="CSV column of texts (default title)")
    p.add_argument("--batch_size", type=int, default=64, help="inputs per step, over all devices (default 64)")


def _embed_parser() -> ArgumentParser:
    p = ArgumentParser(prog="clipjax-embed", doc=__doc__)
    _common(p)
    p.add_argument("--out", required=True, help="FILE.npy (with FILE.keys.txt) or FILE.parquet")
    p.add_argument("--texts", action="store_true", help="embed the texts of SOURCE instead of its images")
    return p


def _predict_parser() -> ArgumentParser:
    p = ArgumentParser(prog="clipjax-predict", doc=__doc__)
    _common(p)
    p.add_argument("--classes", required=True, help="class names: comma-separated, or a file with one a line")
    p.add_argument("--templates", default="single",
                   help="prompts: single ('a photo of a {}.'), short, openai (80), or a file (default single)")
    p.add_argument("--out", default=None, help="write FILE.csv (key, then class and probability per rank)")
    p.add_argument("--top_k", type=int, default=1, help="classes per image in --out (default 1)")
    return p


def _load(a: argparse.Namespace):
    from clipjax.inference import load

    if a.batch_size < 1:
        raise UserError(f"--batch_size={a.batch_size}: must be at least 1")
    return load(a.model, a.step, model=a.openclip_model, batch_size=a.batch_size)


def _bar(total: int, what: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit=what, file=sys.stderr, dynamic_ncols=True, disable=None)


def _keyed(listing) -> tuple[list[str], Any, Any]:
    """(keys, filled as items are read; the items; their names for error messages)."""
    keys: list[str] = []
    a, b = itertools.tee(iter(listing))

    def names():
        for key, item in b:
            keys.append(key)
            yield key if not isinstance(item, str) or listing.kind == "text" else item

    return keys, (item for _, item in a), names()


def embed(a: argparse.Namespace) -> str:
    from clipjax.data.listing import open_listing

    if not a.out.endswith((".npy", ".parquet")):
        raise UserError(f"--out={a.out}: expected FILE.npy or FILE.parquet")
    listing = open_listing(a.source, "text" if a.texts else "image", split=a.split, img_key=a.img_key,
                           caption_key=a.caption_key)
    model = _load(a)
    keys, items, names = _keyed(listing)
    with _bar(len(listing), "text" if a.texts else "img") as bar:
        if a.texts:
            texts = list(items)
            list(names)
            z = model.encode_texts(texts, progress=bar.update)
        else:
            z = model.encode_images(items, names=names, progress=bar.update)
    write_embeddings(a.out, keys, z)
    return f"wrote {a.out}: {z.shape[0]} {'texts' if a.texts else 'images'} x {z.shape[1]}"


def write_embeddings(out: str, keys: list[str], z_NE: np.ndarray) -> None:
    """``out`` .npy (plus ``.keys.txt`` beside it) or .parquet (columns key, embedding)."""
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    if out.endswith(".npy"):
        np.save(out, z_NE)
        with open(out[:-len(".npy")] + ".keys.txt", "w", encoding="utf-8") as f:
            f.writelines(k.replace("\n", " ") + "\n" for k in keys)
        return
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UserError(f"--out={out}: writing Parquet needs pyarrow (pip install pyarrow), or write .npy") from e
    width = z_NE.shape[1]
    column = pa.FixedSizeListArray.from_arrays(pa.array(z_NE.reshape(-1), pa.float32()), width)
    pq.write_table(pa.table({"key": pa.array(keys, pa.string()), "embedding": column}), out)


def read_classes(spec: str) -> list[str]:
    """``--classes``: a file of one name a line, or comma-separated names."""
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
    if len(names) < 2:
        raise UserError(f"--classes={spec}: need at least two class names (comma-separated, or a file of one a line)")
    return names


def predict(a: argparse.Namespace) -> str:
    from clipjax.data.listing import open_listing

    if a.top_k < 1:
        raise UserError(f"--top_k={a.top_k}: must be at least 1")
    classnames = read_classes(a.classes)
    listing = open_listing(a.source, "image", split=a.split, img_key=a.img_key, caption_key=a.caption_key)
    model = _load(a)
    keys, items, names = _keyed(listing)
    try:
        with _bar(len(listing), "img") as bar:
            result = model.zero_shot(items, classnames, a.templates, names=names, progress=bar.update)
    except FileNotFoundError as e:
        raise UserError(f"--templates={a.templates}: {e}") from e
    order = np.argsort(-result.scores, axis=1, kind="stable")[:, :min(a.top_k, len(classnames))]
    lines = []
    if a.out:
        with open(a.out, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["key"] + [f"{c}{r + 1}" for r in range(order.shape[1]) for c in ("class", "prob")])
            for key, row, p in zip(keys, order, result.probs):
                w.writerow([key] + [v for c in row for v in (classnames[c], f"{p[c]:.6f}")])
        lines.append(f"wrote {a.out}: {len(keys)} images")
    else:
        for key, c, p in zip(keys, result.index, result.probs):
            lines.append(f"{key}\t{classnames[c]}\t{p[c]:.4f}")
    truth = [_folder_class(k, classnames) for k in keys]
    if keys and all(t is not None for t in truth):
        right = np.mean([classnames[c] == t for c, t in zip(result.index, truth)])
        lines.append(f"accuracy {right:.4f} over {len(keys)} images (true class: the folder each image is in)")
    return "\n".join(lines)


def _folder_class(key: str, classnames: list[str]) -> str | None:
    parent = os.path.basename(os.path.dirname(key))
    for name in (parent, parent.replace("_", " ")):
        if name in classnames:
            return name
    return None


def _command(prog: str, parser: Callable[[], ArgumentParser], body: Callable[[argparse.Namespace], str],
             argv: list[str] | None) -> int:
    if argv is None:  # the command line, not a caller in this process
        host_env.configure()

    def main(args: list[str]) -> int:
        a = parser().parse_args(args)
        print(body(a))
        return 0

    return run_cli(prog, main, argv)


def embed_main(argv: list[str] | None = None) -> int:
    return _command("clipjax-embed", _embed_parser, embed, argv)


def predict_main(argv: list[str] | None = None) -> int:
    return _command("clipjax-predict", _predict_parser, predict, argv)


if __name__ == "__main__":
    sys.exit(embed_main())
