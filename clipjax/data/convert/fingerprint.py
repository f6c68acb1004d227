"""What a split's records were made from: the inputs' identity and the options, recorded in
``<out>/_stats/<split>.fingerprint.json`` before any shard is written.

A later run into the same folder resumes only when its fingerprint is equal; otherwise it
refuses (naming what changed); with ``overwrite`` the split is deleted and written anew.
Inputs are identified by the content of metadata files (CSV, COCO JSON), the listing with
sizes of an image folder, and the names and sizes of tars; image files named by a CSV or
COCO file are not hashed.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

from clipjax.atomic import write_text
from clipjax.data.convert.options import ConvertError, ConvertOptions
from clipjax.data.convert.shards import STATS_DIR, split_files


def path(opts: ConvertOptions) -> str:
    return os.path.join(opts.out_dir, STATS_DIR, f"{opts.split}.fingerprint.json")


def _changed(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def prepare_output(opts: ConvertOptions, fingerprint: dict[str, Any]) -> None:
    """Checks the folder's split against ``fingerprint`` (see the module doc) and records it."""
    fp_path = epath.Path(path(opts))
    existing = split_files(opts)
    if fp_path.exists():
        old = json.loads(fp_path.read_text())
        changed = _changed(old, fingerprint)
    else:
        changed = ["no fingerprint (written by an older clipjax?)"] if existing else []
    if changed and not opts.overwrite:
        raise ConvertError(f"{opts.out_dir} already holds split {opts.split!r} made from other inputs or options "
                           f"(changed: {', '.join(changed[:6])}); rerun with --overwrite to replace it, "
                           "or use another --out or --split")
    if opts.overwrite:  # replace whatever is there, changed or not
        for p in existing + [epath.Path(os.path.join(opts.out_dir, f"{opts.split}-summary.json"))]:
            p.unlink(missing_ok=True)
    write_text(fp_path, json.dumps(fingerprint, indent=2, sort_keys=True))
