"""A procedurally drawn, learnable image-text dataset for demos and tests.

Each image shows one to three shapes of one colour and size on a plain grey
background with slight noise; its captions (several paraphrases) name colour,
shape, count, size and position, class words first, e.g.
"red circle. two small ones on the left.". Its regions are each shape's true
box with its description ("small red circle"), for the LocCa decoder.

Classes are the colour x shape pairs (``CLASSES``, label = index). The
attribute tuples (colour, shape, size, count, position) are partitioned: every
class appears in both splits, but a held-out tuple never appears in training,
so zero-shot accuracy on ``heldout`` measures composition, not memorisation.

Files: ``train-*.array_record``, ``heldout-*.array_record`` (records.py
format) and ``info.json`` (written last: a folder without it is incomplete).
"""

from __future__ import annotations

import io
import json
import os
import re
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from clipjax.atomic import atomic_path
from clipjax.data import records
from clipjax.errors import UserError

SPLIT_TRAIN = "train"
SPLIT_HELDOUT = "heldout"
INFO_FILE = "info.json"
FORMAT_VERSION = 3  # 3: records carry each shape's box ("regions")

# Distinct hues, none starting with a vowel (so "a {colour} {shape}" reads right).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 200),
    "white": (250, 250, 250),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SIZES: tuple[str, ...] = ("small", "large")
COUNTS: tuple[str, ...] = ("one", "two", "three")
POSITIONS: tuple[str, ...] = ("on the left", "on the right", "at the top", "at the bottom", "in the middle")

# Zero-shot class names (label = index) and prompt templates.
CLASSES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
# Prompts name a class the way this dataset's captions do ("red circle.", "a red circle."),
# as OpenAI's templates follow web alt-text: a template no caption resembles ("a picture of
# a {}.") only adds an off-distribution text embedding to the class mean (85% -> 72% top-1).
TEMPLATES: tuple[str, ...] = ("{}.", "a {}.")

# Side of a shape as a fraction of the image side.
_SIZE_FRAC = {"small": 0.24, "large": 0.38}
# Region (x0, y0, x1, y1) as fractions of the image, per position.
_REGIONS = {
    "on the left": (0.0, 0.0, 0.5, 1.0),
    "on the right": (0.5, 0.0, 1.0, 1.0),
    "at the top": (0.0, 0.0, 1.0, 0.5),
    "at the bottom": (0.0, 0.5, 1.0, 1.0),
    "in the middle": (0.15, 0.15, 0.85, 0.85),
}
_SPLIT_IDS = {SPLIT_TRAIN: 0, SPLIT_HELDOUT: 1}


def is_heldout(label: int, size: str, count: str, position: str) -> bool:
    """Whether an attribute tuple belongs to the held-out split.

    For each class and each (size, count) exactly one of the five positions is
    held out, shifted by the class index, so every attribute value is seen in
    training with every class and 1/5 of the tuples are held out.
    """
    key = SIZES.index(size) + COUNTS.index(count) + POSITIONS.index(position) + label
    return key % len(POSITIONS) == 0


def _combos(split: str) -> list[tuple[int, str, str, str]]:
    want = split == SPLIT_HELDOUT
    return [(lab, s, c, p) for lab in range(len(CLASSES)) for s in SIZES for c in COUNTS for p in POSITIONS
            if is_heldout(lab, s, c, p) == want]


HELDOUT_COMBOS: tuple[tuple[int, str, str, str], ...] = tuple(_combos(SPLIT_HELDOUT))


def captions_for(colour: str, shape: str, size: str, count: str, position: str) -> list[str]:
    """Paraphrases of one image's content; most lead with the class words."""
    n = COUNTS.index(count) + 1
    noun = shape if n == 1 else PLURALS[shape]
    ones = "one" if n == 1 else "ones"
    return [
        f"{colour} {shape}. {count} {size} {ones} {position}.",
        f"{colour} {shape}, {'just one' if n == 1 else count + ' of them'}, {size}, {position}",
        f"{count} {size} {colour} {noun} {position}",
        f"a drawing of {count} {size} {colour} {noun} {position}",
        # Short alt-text, as web captions often are: without it the text tower only ever
        # pools at the end of long captions and a short zero-shot prompt is out of distribution.
        f"a {colour} {shape}.",
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float, fill) -> float:
    """Draws the shape; returns its half extent (its box is the centre +- that)."""
    h = side / 2
    if shape == "circle":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "square":
        h = h * 0.88  # a square of the same side looks bigger than the circle
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
    elif shape == "cross":
        t = side / 6  # half the bar thickness
        draw.rectangle((cx - h, cy - t, cx + h, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - h, cx + t, cy + h), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return h


def draw_image(rng: np.random.Generator, image_size: int, colour: str, shape: str, size: str, count: str,
               position: str) -> tuple[np.ndarray, list[list[float]], list[str]]:
    """uint8 [S, S, 3] picture of ``count`` shapes, one per cell of the region; each shape's
    box ``[x0, y0, x1, y1]`` as fractions of the side, and which one it is along the split
    ("left ", "middle ", "bottom " ...; "" for a single shape)."""
    s = image_size
    bg = int(rng.integers(80, 150))
    img = Image.new("RGB", (s, s), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    fill = tuple(int(v) for v in np.clip(np.asarray(COLOURS[colour]) + rng.integers(-15, 16, 3), 0, 255))
    x0, y0, x1, y1 = (f * s for f in _REGIONS[position])
    n = COUNTS.index(count) + 1
    # Split the region into n cells along its longer axis (a random one for the square
    # middle) and jitter one shape inside each: only large shapes in narrow cells touch, so counts stay readable.
    vertical = (y1 - y0) > (x1 - x0) or ((y1 - y0) == (x1 - x0) and bool(rng.integers(2)))
    order = rng.permutation(n)  # which cell gets which (slightly different) size
    boxes, names = [], []
    ends = ("top", "bottom") if vertical else ("left", "right")
    for k in range(n):
        side = _SIZE_FRAC[size] * s * float(rng.uniform(0.9, 1.1))
        h = side / 2 + 1
        if vertical:
            cx0, cy0, cx1, cy1 = x0, y0 + (y1 - y0) * order[k] / n, x1, y0 + (y1 - y0) * (order[k] + 1) / n
        else:
            cx0, cy0, cx1, cy1 = x0 + (x1 - x0) * order[k] / n, y0, x0 + (x1 - x0) * (order[k] + 1) / n, y1
        cx = float(rng.uniform(cx0 + h, max(cx0 + h, cx1 - h)))
        cy = float(rng.uniform(cy0 + h, max(cy0 + h, cy1 - h)))
        e = _draw_shape(draw, shape, cx, cy, side, fill)
        boxes.append([float(np.clip(v / s, 0.0, 1.0)) for v in (cx - e, cy - e, cx + e, cy + e)])
        # Which one along the split, so that each region's text names one shape.
        names.append("" if n == 1 else f"{(ends[0], 'middle', ends[1])[order[k] * 2 // (n - 1)] if n == 3 else ends[order[k]]} ")
    noisy_hw3 = np.asarray(img, np.int16) + rng.integers(-8, 9, (s, s, 3), dtype=np.int16)
    return np.clip(noisy_hw3, 0, 255).astype(np.uint8), boxes, names


def make_example(seed: int, split: str, index: int, image_size: int, jpeg_quality: int) -> records.Example:
    """The ``index``-th example of ``split``: a function of (seed, split, index) only."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    combos = _COMBOS_BY_SPLIT[split]
    label, size, count, position = combos[int(rng.integers(len(combos)))]
    colour, shape = list(COLOURS)[label // len(SHAPES)], SHAPES[label % len(SHAPES)]
    pixels, boxes, names = draw_image(rng, image_size, colour, shape, size, count, position)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=jpeg_quality)
    return records.Example(key=f"{split}-{index:07d}", image=buf.getvalue(),
                           captions=captions_for(colour, shape, size, count, position), label=label,
                           regions=[{"box": box, "text": f"{name}{size} {colour} {shape}"}
                                    for box, name in zip(boxes, names)])


_COMBOS_BY_SPLIT = {SPLIT_TRAIN: _combos(SPLIT_TRAIN), SPLIT_HELDOUT: list(HELDOUT_COMBOS)}


def _settings(synth_cfg: Any) -> dict[str, int]:
    keys = ("num_train", "num_heldout", "image_size", "seed", "num_train_shards", "jpeg_quality")
    return {k: int(synth_cfg[k]) for k in keys}


def info_for(settings: dict[str, int]) -> dict[str, Any]:
    """The ``info.json`` content for the given generation settings."""
    return {
        "format_version": FORMAT_VERSION,
        "settings": settings,
        "splits": {
            SPLIT_TRAIN: {"num_examples": settings["num_train"], "num_shards": settings["num_train_shards"]},
            SPLIT_HELDOUT: {"num_examples": settings["num_heldout"], "num_shards": 1},
        },
        "classes": list(CLASSES),
        "templates": list(TEMPLATES),
        "attributes": {"colours": list(COLOURS), "shapes": list(SHAPES), "sizes": list(SIZES),
                       "counts": list(COUNTS), "positions": list(POSITIONS)},
        "heldout_combos": [list(c) for c in HELDOUT_COMBOS],  # (label, size, count, position)
        "label_field": "records.Example.label is the index into classes, in both splits",
    }


def generate(folder: str, synth_cfg: Any) -> dict[str, Any]:
    """Writes both splits and then ``info.json`` into ``folder``; returns the info."""
    st = _settings(synth_cfg)
    st["num_train_shards"] = min(st["num_train_shards"], st["num_train"])  # no empty shards
    os.makedirs(folder, exist_ok=True)
    for split, num, shards in ((SPLIT_TRAIN, st["num_train"], st["num_train_shards"]),
                               (SPLIT_HELDOUT, st["num_heldout"], 1)):
        for k in range(shards):
            lo, hi = k * num // shards, (k + 1) * num // shards
            with records.ShardWriter(os.path.join(folder, records.shard_name(split, k, shards))) as w:
                for i in range(lo, hi):
                    w.write(make_example(st["seed"], split, i, st["image_size"], st["jpeg_quality"]))
    info = info_for(st)
    # Last and atomic (per process: several may generate at once): marks the folder complete.
    with atomic_path(os.path.join(folder, INFO_FILE)) as tmp, open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    return info


class SynthMismatch(UserError, ValueError):
    """A complete synthetic dataset folder made with other settings than the config's."""


def load_info(folder: str) -> dict[str, Any] | None:
    """The folder's ``info.json``, or None when the dataset is not (completely) there."""
    path = os.path.join(folder, INFO_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def ensure_synthetic(folder: str, synth_cfg: Any) -> dict[str, Any]:
    """Generates the dataset into ``folder`` unless it is already complete; returns info.json.

    Idempotent; an interrupted run leaves no ``info.json`` and is redone. A complete
    folder generated with other settings is an error rather than silently reused.
    """
    info = load_info(folder)
    want = _settings(synth_cfg)
    want["num_train_shards"] = min(want["num_train_shards"], want["num_train"])
    if info is None:
        return generate(folder, synth_cfg)
    if info.get("format_version") != FORMAT_VERSION:
        # Made by an older clipjax (other drawings or captions): ours to replace.
        for name in os.listdir(folder):
            if name == INFO_FILE or re.fullmatch(rf"({SPLIT_TRAIN}|{SPLIT_HELDOUT})-\d{{5}}-of-\d{{5}}\.array_record", name):
                os.remove(os.path.join(folder, name))
        return generate(folder, synth_cfg)
    have = info.get("settings") or {}
    if have != want:
        diff = [k for k in sorted(set(want) | set(have)) if have.get(k) != want.get(k)]
        raise SynthMismatch(f"{folder} holds a synthetic dataset made with {', '.join(f'{k}={have.get(k)}' for k in diff)}, "
                            f"not {', '.join(f'{k}={want.get(k)}' for k in diff)}: give this config its own folder "
                            f"(config argument data=DIR, or --config.data.path=DIR) or delete {folder}")
    return info
