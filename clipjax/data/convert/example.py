"""The per-example work every converter and runner shares: read, sanitise, clean captions, key.

An ``Item`` is one example's inputs as a source lists them; ``make_example`` turns it
into the record to write, or counts why it is skipped. The single-process and Beam
paths both call it (through ``shards.run_task``), so they write the same records.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from etils import epath

from clipjax.data import records
from clipjax.data.captions import BadCaption, clean_caption_info
from clipjax.data.convert.options import ConvertOptions
from clipjax.data.images import BadImage, prepare

# Skip reasons. Per example, except unsafe_member (per tar member) and truncated_tar (per tar).
REASONS = ("missing_image", "bad_image", "too_large", "no_caption", "bad_caption", "duplicate_key",
           "unsafe_member", "truncated_tar")


@dataclass(frozen=True)
class Item:
    """One example's inputs: an image (``image_path`` to read, or ``image`` bytes) and raw captions."""

    key: str
    captions: tuple[bytes | str, ...]
    image_path: str = ""
    image: bytes | None = None
    label: int = -1
    skip: tuple[str, str] | None = None  # (reason, detail) decided while listing/streaming the input
    origin: str = ""  # where the example came from when that is not image_path (tar:key)
    regions: tuple[dict, ...] = ()  # {"box": [x0, y0, x1, y1] image fractions, "text": str} (records.py)

    @property
    def input(self) -> str:
        """What the skipped report names: the image file, else the origin, else the key."""
        return self.image_path or self.origin or self.key


@dataclass
class ShardStats:
    written: int = 0
    labelled: int = 0
    reencoded: int = 0
    captions_truncated: int = 0
    captions_dropped: int = 0  # invalid captions of examples kept thanks to another caption
    max_label: int = -1  # the largest label written (-1: none); zero-shot checks its class list against it
    skipped: Counter = field(default_factory=Counter)
    skipped_inputs: list = field(default_factory=list)  # [key, input, reason, detail]

    def skip(self, key: str, input: str, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.skipped_inputs.append([key, input, reason, detail])

    def add(self, other: "ShardStats") -> None:
        for name in ("written", "labelled", "reencoded", "captions_truncated", "captions_dropped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.max_label = max(self.max_label, other.max_label)
        self.skipped.update(other.skipped)
        self.skipped_inputs += other.skipped_inputs

    def to_json(self) -> dict[str, Any]:
        return {"written": self.written, "labelled": self.labelled, "reencoded": self.reencoded,
                "captions_truncated": self.captions_truncated, "captions_dropped": self.captions_dropped,
                "max_label": self.max_label, "skipped": dict(self.skipped), "skipped_inputs": self.skipped_inputs}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ShardStats":
        return cls(d["written"], d["labelled"], d["reencoded"], d["captions_truncated"], d["captions_dropped"],
                   d.get("max_label", -1), Counter(d["skipped"]), d["skipped_inputs"])  # older stats lack max_label


class _Skip(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def read_input(path: str, max_bytes: int) -> bytes:
    """The file's bytes (local or bucket path); ``_Skip`` when absent or over ``max_bytes`` (never read)."""
    p = epath.Path(path)
    try:
        size = p.stat().length
        if size > max_bytes:
            raise _Skip("too_large", f"{size} bytes > {max_bytes}")
        with p.open("rb") as f:
            data = f.read(max_bytes + 1)  # the file may have grown since stat
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        raise _Skip("missing_image", type(e).__name__) from None
    if len(data) > max_bytes:
        raise _Skip("too_large", f"more than {max_bytes} bytes")
    return data


def _captions(raw: Sequence[bytes | str], opts: ConvertOptions, stats: ShardStats) -> list[str]:
    """Cleaned captions; ``_Skip`` when none is usable."""
    out, reason = [], None
    for c in raw:
        try:
            text, cut = clean_caption_info(c, max_chars=opts.max_caption_chars)
        except BadCaption as e:
            reason = reason or ("no_caption" if "empty" in str(e) else "bad_caption")
            continue
        stats.captions_truncated += int(cut)
        out.append(text)
    if not out:
        raise _Skip(reason or "no_caption")
    stats.captions_dropped += len(raw) - len(out)
    return out


def make_example(item: Item, opts: ConvertOptions, stats: ShardStats) -> records.Example | None:
    """The record to write for ``item``, or None with the skip counted in ``stats``."""
    try:
        if item.skip is not None:
            raise _Skip(*item.skip)
        image = item.image if not item.image_path else read_input(item.image_path, opts.max_input_bytes)
        if image is None:
            raise _Skip("missing_image")
        captions = _captions(item.captions, opts, stats)
        try:
            data, converted = prepare(image, opts.max_side, quality=opts.quality)
        except BadImage as e:
            raise _Skip("bad_image", str(e)) from None
    except _Skip as s:
        stats.skip(item.key, item.input, s.reason, s.detail)
        return None
    stats.reencoded += int(converted)
    stats.written += 1
    stats.labelled += int(item.label >= 0)
    stats.max_label = max(stats.max_label, item.label)
    return records.Example(key=item.key, image=data, captions=captions, label=item.label, regions=list(item.regions))
