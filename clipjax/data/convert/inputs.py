"""Listing the examples of a CSV, a COCO JSON or a class-per-folder tree as ``Item``s.

Each lister also returns what identifies its inputs for the output's fingerprint.
Metadata files are read through epath, so bucket paths (``gs://...``) work as well as
local ones. Malformed metadata is a ``ConvertError`` naming the file and the entry.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
from typing import Any

from etils import epath

from clipjax.data.convert.example import Item
from clipjax.data.convert.labels import ClassNames, label_values, readable
from clipjax.data.convert.options import ConvertError
from clipjax.data.convert.tars import is_unsafe_member

# Images a class folder may hold (any case); other files are not read.
FOLDER_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def _join(folder: str, rel: str) -> str:
    if "://" in rel or os.path.isabs(rel):
        return rel
    if "://" in folder:
        return posixpath.join(folder, rel)
    return os.path.join(os.path.abspath(folder), rel)


def _read(path: str) -> bytes:
    p = epath.Path(path)
    if not p.exists():
        raise ConvertError(f"{path}: no such file")
    return p.read_bytes()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_regions(value: Any, where: str) -> tuple[dict, ...]:
    """Regions from JSON text or a list: ``[{"box": [x0, y0, x1, y1], "text": "..."}]``, boxes as
    fractions of the image (0 <= x0 < x1 <= 1); a ConvertError naming ``where`` otherwise."""
    try:
        regions = json.loads(value) if isinstance(value, str) else value
    except ValueError as e:
        raise ConvertError(f"{where}: regions are not valid JSON ({e})") from None
    if not isinstance(regions, list):
        raise ConvertError(f"{where}: regions must be a JSON list of {{\"box\": [x0, y0, x1, y1], \"text\": ...}}")
    out = []
    for r in regions:
        box = r.get("box") if isinstance(r, dict) else None
        ok = isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
        if not ok or not isinstance(r.get("text"), str) or not r["text"].strip():
            raise ConvertError(f"{where}: region {json.dumps(r)[:80]} needs \"box\": [x0, y0, x1, y1] and a \"text\"")
        if not 0 <= box[0] < box[2] <= 1 or not 0 <= box[1] < box[3] <= 1:
            raise ConvertError(f"{where}: region box {box} is not inside [0, 1] with x0 < x1, y0 < y1 "
                               "(boxes are fractions of the image width and height)")
        out.append({"box": [float(v) for v in box], "text": r["text"].strip()})
    return tuple(out)


def csv_items(csv_path: str, *, img_key: str = "filepath", caption_key: str = "title", sep: str | None = None,
              label_column: str | None = None, classes: ClassNames | None = None,
              regions_column: str | None = None) -> tuple[list[Item], dict[str, Any]]:
    """Items of an OpenCLIP-style CSV/TSV (rows naming one image path merge into one example), and
    its fingerprint inputs. ``sep`` defaults to tab for .tsv/.tab, comma otherwise. A
    ``regions_column`` holds each row's regions as JSON (``parse_regions``); an image's rows add theirs up."""
    if sep is None:
        sep = "\t" if csv_path.lower().endswith((".tsv", ".tab", ".tsv.txt")) else ","
    raw = _read(csv_path)
    # utf-8-sig drops a byte-order mark; surrogateescape keeps invalid bytes so each caption is judged alone.
    text = raw.decode("utf-8-sig", errors="surrogateescape")
    groups: dict[str, list] = {}  # resolved image path -> [rel, captions, label values, first line, regions]
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # huge captions are cut later, not a parse error; restored below
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=sep, strict=True)
        columns = reader.fieldnames or []
        wanted = [img_key, caption_key] + [k for k in (label_column, regions_column) if k]
        missing = [k for k in wanted if k not in columns]
        if missing:
            raise ConvertError(f"{csv_path}: no column(s) {missing}; columns are {columns} "
                               f"(separator {sep!r}; set --img_key/--caption_key/--label_column/--sep)")
        folder = posixpath.dirname(csv_path) if "://" in csv_path else os.path.dirname(os.path.abspath(csv_path))
        start = reader.line_num + 1
        try:
            for row in reader:
                rel = row.get(img_key) or ""
                cap = (row.get(caption_key) or "").encode("utf-8", "surrogateescape")
                g = groups.setdefault(_join(folder, rel), [rel, [], [], start, []])
                g[1].append(cap)
                if label_column:
                    g[2].append(row.get(label_column) or "")
                if regions_column and (row.get(regions_column) or "").strip():
                    g[4] += parse_regions(row[regions_column], f"{csv_path} line {start} column {regions_column}")
                start = reader.line_num + 1
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise ConvertError(f"{csv_path}: unterminated quote in the row starting at line {start} (it would "
                                   f"swallow the remaining {reader.reader.line_num - start + 1} lines); close or remove "
                                   "the quote") from None
            raise ConvertError(f"{csv_path}: line {reader.reader.line_num}: malformed CSV ({e}); quote fields that "
                               "contain the separator or quotes, doubling inner quotes") from None
    finally:
        csv.field_size_limit(old_limit)
    if not groups:
        raise ConvertError(f"{csv_path}: no rows after the header; nothing to convert")
    labels = [-1] * len(groups)
    if label_column:
        for rel, _, values, line, _ in groups.values():
            if len({v.strip() for v in values}) > 1:
                raise ConvertError(f"{csv_path}: image {rel} (first at line {line}) has different labels "
                                   f"{sorted({v.strip() for v in values})}; give each image one label")
        labels = label_values([g[2][0] for g in groups.values()], classes, f"{csv_path} column {label_column}")
    items = [Item(key=rel, captions=tuple(caps), image_path=path, label=label, regions=tuple(regions))
             for (path, (rel, caps, _, _, regions)), label in zip(groups.items(), labels)]  # first-appearance order
    return items, {"csv": os.path.abspath(csv_path) if "://" not in csv_path else csv_path, "sha256": _digest(raw)}


def _entry(items: Any, i: int, fields: tuple[str, ...], path: str, what: str) -> dict:
    e = items[i]
    if not isinstance(e, dict):
        raise ConvertError(f"{path}: {what}[{i}] is a {type(e).__name__}, not an object")
    missing = [f for f in fields if f not in e]
    if missing:
        raise ConvertError(f"{path}: {what}[{i}] has no {missing} ({json.dumps(e)[:120]}); every entry needs "
                           f"{list(fields)}")
    return e


def _coco_json(json_path: str) -> tuple[dict, bytes]:
    raw = _read(json_path)
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"{json_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("images"), list) \
            or not isinstance(meta.get("annotations"), list):
        raise ConvertError(f"{json_path}: not a COCO captions file (needs 'images' and 'annotations' lists)")
    return meta, raw


def coco_regions(meta: dict, json_path: str) -> dict[Any, list[dict]]:
    """Image id -> its instance boxes (``bbox`` [x, y, w, h] pixels, as fractions of the image's
    width/height) named by their category, from a COCO instances file (annotations without
    ``bbox``, e.g. captions, are passed over)."""
    cats = meta.get("categories") or []
    names = {c["id"]: str(c["name"]) for c in (_entry(cats, i, ("id", "name"), json_path, "categories")
                                               for i in range(len(cats)))}
    sizes = {im.get("id"): (im.get("width"), im.get("height")) for im in meta["images"] if isinstance(im, dict)}
    out: dict[Any, list[dict]] = {}
    for i, a in enumerate(meta["annotations"]):
        if not isinstance(a, dict) or "bbox" not in a:
            continue
        a = _entry(meta["annotations"], i, ("image_id", "bbox", "category_id"), json_path, "annotations")
        w, h = sizes.get(a["image_id"], (None, None))
        if not w or not h:
            raise ConvertError(f"{json_path}: image {a['image_id']!r} of annotations[{i}] has no width/height; "
                               "instance boxes are stored as fractions of the image size")
        if a["category_id"] not in names:
            raise ConvertError(f"{json_path}: annotations[{i}] has category_id {a['category_id']!r}, "
                               "which is not in 'categories'")
        x, y, bw, bh = (float(v) for v in a["bbox"])
        box = [max(x / w, 0.0), max(y / h, 0.0), min((x + bw) / w, 1.0), min((y + bh) / h, 1.0)]
        if box[0] < box[2] and box[1] < box[3]:  # COCO has a few degenerate boxes
            out.setdefault(a["image_id"], []).append({"box": box, "text": names[a["category_id"]]})
    return out


def coco_items(json_path: str, image_dir: str, classes: ClassNames,
               instances_path: str | None = None) -> tuple[list[Item], dict[str, Any]]:
    """One item per COCO image (by id) with all its captions; the label is the image's category when
    the file has ``categories`` and the image's annotations agree on one ``category_id``. Instance
    boxes (``coco_regions``) of the file and of ``instances_path`` become the image's regions."""
    meta, raw = _coco_json(json_path)
    regions = coco_regions(meta, json_path)
    if instances_path:
        for image_id, rs in coco_regions(_coco_json(instances_path)[0], instances_path).items():
            regions.setdefault(image_id, []).extend(rs)
    if not meta["images"]:
        raise ConvertError(f"{json_path}: 'images' is empty; nothing to convert")
    cats = meta.get("categories") or []
    cat_names: dict[Any, str] = {}
    for i in range(len(cats)):
        c = _entry(cats, i, ("id", "name"), json_path, "categories")
        cat_names[c["id"]] = str(c["name"])
    caps: dict[Any, list[str]] = {}
    cat_of: dict[Any, set] = {}
    for i in range(len(meta["annotations"])):
        a = _entry(meta["annotations"], i, ("image_id",), json_path, "annotations")
        if "caption" not in a and not (cats and "category_id" in a):
            raise ConvertError(f"{json_path}: annotations[{i}] has no ['caption'] ({json.dumps(a)[:120]}); every "
                               "annotation needs a caption (or, in a file with 'categories', a category_id)")
        if "caption" in a:
            caps.setdefault(a["image_id"], []).append(a["caption"] if isinstance(a["caption"], str) else "")
        if cats and "category_id" in a:
            if a["category_id"] not in cat_names:
                raise ConvertError(f"{json_path}: annotations[{i}] has category_id {a['category_id']!r}, "
                                   "which is not in 'categories'")
            cat_of.setdefault(a["image_id"], set()).add(a["category_id"])
    if cats:
        # Categories in id order are the labels 0, 1, ... (COCO ids have gaps).
        classes.add([cat_names[k] for k in sorted(cat_names)], f"{json_path} categories")
    images = [_entry(meta["images"], i, ("id", "file_name"), json_path, "images") for i in range(len(meta["images"]))]
    for i, im in enumerate(images):
        # Refused as tar members are: a COCO file must not make the converter read outside --images.
        if is_unsafe_member(str(im["file_name"])) or "://" in str(im["file_name"]):
            raise ConvertError(f"{json_path}: images[{i}] has file_name {str(im['file_name'])!r}, which points "
                               f"outside --images {image_dir}; file names must be relative paths inside it")
    items = []
    for im in sorted(images, key=lambda im: im["id"]):
        found = cat_of.get(im["id"], set())
        label = classes[cat_names[next(iter(found))]] if len(found) == 1 else -1
        items.append(Item(key=str(im["id"]), captions=tuple(caps.get(im["id"], [])),
                          image_path=_join(image_dir, str(im["file_name"])), label=label,
                          regions=tuple(regions.get(im["id"], ()))))
    ident = {"json": os.path.abspath(json_path) if "://" not in json_path else json_path,
             "sha256": _digest(raw), "images": _join(image_dir, "")}
    if instances_path:
        ident["instances_sha256"] = _digest(_read(instances_path))
    return items, ident


def folder_items(root: str, caption_template: str, classes: ClassNames) -> tuple[list[Item], dict[str, Any]]:
    """One item per image under ``root/<class>/`` (any depth), captioned ``caption_template`` filled with
    the class name (underscores as spaces), labelled by the class folder. Classes in sorted order."""
    if caption_template.count("{}") != 1:
        raise ConvertError(f"--caption_template {caption_template!r} needs exactly one {{}} for the class name")
    base = epath.Path(root)
    if not base.is_dir():
        raise ConvertError(f"{root} is not a folder; give the folder holding one sub-folder per class")
    class_dirs = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[str, str, int]] = []  # (class, path relative to root, size)
    for d in class_dirs:
        for dirpath, _, names in d.walk():
            for n in sorted(names):
                if n.lower().endswith(FOLDER_IMAGE_EXTS) and not n.startswith("."):
                    p = epath.Path(dirpath) / n
                    files.append((d.name, os.fspath(p.relative_to(base)), p.stat().length))
    if not files:
        raise ConvertError(f"{root}: no images in class sub-folders (root/<class>/<image>, extensions "
                           f"{', '.join(FOLDER_IMAGE_EXTS)})")
    files.sort()
    classes.add({c for c, _, _ in files}, root)
    items = [Item(key=rel, captions=(caption_template.format(readable(c)),), image_path=os.fspath(base / rel),
                  label=classes[c]) for c, rel, _ in files]
    listing = "".join(f"{rel}\t{size}\n" for _, rel, size in files).encode("utf-8", "surrogateescape")
    return items, {"folder": os.path.abspath(root) if "://" not in root else root, "sha256": _digest(listing)}
