"""Host half of image preprocessing: decode, choose the crop box, cut out its pixels.

The host decodes (JPEG draft mode when it still covers the output size), draws
the crop box and ships the pixels under it, plus a filter margin, as uint8 in a
fixed ``[P, P, 3]`` batch buffer with the box and the valid extent. Resampling to the
model's size and normalising happen on the accelerator (``resize.py``), so the
host does no per-pixel arithmetic beyond the decode and one copy.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from clipjax.data import images, resize

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in source pixels


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """How an encoded image becomes the device's crop (host settings from ``config.data``)."""

    image_size: int
    crop_scale: tuple[float, float] = (0.9, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    draft: bool = True
    draft_min_scale: float = 0.8
    eval_crop: str = "centre"  # one of EVAL_CROPS

    @classmethod
    def from_config(cls, data_cfg: Any, image_size: int) -> "ImageOptions":
        return cls(image_size=int(image_size), crop_scale=tuple(float(v) for v in data_cfg["crop_scale"]),
                   crop_ratio=tuple(float(v) for v in data_cfg["crop_ratio"]),
                   interpolation=str(data_cfg["interpolation"]), draft=bool(data_cfg["draft_decode"]),
                   draft_min_scale=float(data_cfg["draft_min_scale"]),
                   eval_crop=str(data_cfg.get("eval_crop", "centre")))

    @property
    def draft_size(self) -> int | None:
        """Smallest shorter side JPEG draft decoding may produce (None: full decode)."""
        return self._draft_side if self.draft else None

    @property
    def _draft_side(self) -> int:
        return math.ceil(self.image_size * self.draft_min_scale)

    @property
    def buffer_size(self) -> int:
        """Side P of the uint8 buffer a crop travels in.

        A draft-decoded JPEG's shorter side is at most 2 * draft side, a crop's longer
        side at most the widest ratio times that, plus the filter margin: such crops
        always fit. Larger ones (huge JPEGs, other formats) are box-reduced first.
        """
        widest = max(1.0, self.crop_ratio[1], 1.0 / self.crop_ratio[0])
        longest = 2 * self._draft_side * widest
        return _round_up(math.ceil(longest) + 2 * _margin(longest / self.image_size, self.interpolation), 8)


def to_rgb(image: bytes | np.ndarray, draft_size: int | None) -> Image.Image:
    """An RGB PIL image from encoded bytes or a uint8 [H, W] / [H, W, C] array.

    Raises images.BadImage (a ValueError) when the bytes do not decode.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return images.load_rgb(bytes(image), draft_size=None if draft_size is None else (draft_size, draft_size))
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise images.BadImage(f"unsupported image array {arr.dtype} {arr.shape}")
    return Image.fromarray(arr).convert("RGB")


def random_crop_box(rng: np.random.Generator, width: int, height: int, scale: tuple[float, float],
                    ratio: tuple[float, float]) -> Box:
    """A random box covering ``scale`` of the area with aspect ratio (w/h) in ``ratio``.

    Falls back to the largest centred box with a ratio in range when no draw fits.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if w <= width and h <= height:
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return (x, y, x + w, y + h)
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = (width, width / aspect) if width / height <= aspect else (height * aspect, height)
    return ((width - w) / 2, (height - h) / 2, (width + w) / 2, (height + h) / 2)


def centre_crop_box(width: int, height: int) -> Box:
    """The centred square of side min(width, height): resize-shorter-side + centre-crop in one."""
    side = min(width, height)
    x, y = (width - side) / 2, (height - side) / 2
    return (x, y, x + side, y + side)


def _openclip_resized(width: int, height: int, size: int) -> tuple[int, int]:
    """The image size after OpenCLIP's Resize(size): shorter side to ``size``, longer truncated."""
    new_long = int(size * max(width, height) / min(width, height))
    return (size, new_long) if width <= height else (new_long, size)


def openclip_crop_box(width: int, height: int, size: int) -> Box:
    """OpenCLIP's validation crop, in source pixels.

    OpenCLIP resizes the shorter side to ``size`` and cuts the centred ``size``
    square at offsets rounded to whole pixels. Resampling this box straight to
    ``size`` reads the same source positions with the same filter widths as
    resizing the whole image and then cropping, so the pixels agree up to
    Pillow's rounding to uint8.
    """
    new_w, new_h = _openclip_resized(width, height, size)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + size) * sx, (top + size) * sy)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _margin(scale: float, interpolation: str) -> int:
    """Source pixels beyond the box that the filter reads when downscaling by ``scale``."""
    return math.ceil(resize.support(interpolation) * max(scale, 1.0)) + 1


def region_bounds(width: int, height: int, box: Box, opts: ImageOptions) -> tuple[int, int, int, int, int]:
    """``(x0, y0, x1, y1, k)``: pixels to ship for ``box`` (box plus filter margin, inside the
    image) and the integer reduction ``k`` that makes them fit the buffer (1: none)."""
    left, top, right, bottom = box
    m = _margin(max(right - left, bottom - top) / opts.image_size, opts.interpolation)
    x0, y0 = max(0, math.floor(left) - m), max(0, math.floor(top) - m)
    x1, y1 = min(width, math.ceil(right) + m), min(height, math.ceil(bottom) + m)
    return x0, y0, x1, y1, -(-max(x1 - x0, y1 - y0) // opts.buffer_size)


def cut_region(img: Image.Image, box: Box, opts: ImageOptions) -> dict[str, np.ndarray]:
    """``{"pixels": uint8 [h, w, 3], "image_box", "image_hw"}``: what carries ``box`` of ``img``
    to the device (``batch_regions`` pads the pixels into the batch buffer)."""
    x0, y0, x1, y1, k = region_bounds(img.width, img.height, box, opts)
    if k == 1:
        pixels = np.asarray(img)[y0:y1, x0:x1]  # a view: the batch buffer is the only copy made
    else:
        pixels = np.asarray(img.reduce(k, (x0, y0, x1, y1)))
    left, top, right, bottom = box
    # reduce(k) maps source coordinate u to (u - origin) / k (pixel edges stay edges).
    crop = np.asarray([(top - y0) / k, (left - x0) / k, (bottom - y0) / k, (right - x0) / k], np.float32)
    return {"pixels": pixels, "image_box": crop, "image_hw": np.asarray(pixels.shape[:2], np.int32)}


def empty_region() -> dict[str, np.ndarray]:
    """A black 1x1 image (padding rows)."""
    return {"pixels": np.zeros((1, 1, 3), np.uint8), "image_box": np.asarray([0, 0, 1, 1], np.float32),
            "image_hw": np.ones((2,), np.int32)}


def batch_regions(rows: Sequence[Mapping[str, np.ndarray]], buffer_size: int) -> dict[str, np.ndarray]:
    """The batch's image fields (``resize.IMAGE_KEYS``) from ``cut_region`` outputs."""
    image = np.zeros((len(rows), buffer_size, buffer_size, 3), np.uint8)
    for i, r in enumerate(rows):
        h, w = r["pixels"].shape[:2]
        image[i, :h, :w] = r["pixels"]
    return {"image": image, "image_box": np.stack([r["image_box"] for r in rows]),
            "image_hw": np.stack([r["image_hw"] for r in rows])}


def _cut_with_crop(img: Image.Image, box: Box, opts: ImageOptions) -> dict[str, np.ndarray]:
    """``cut_region``'s fields plus ``crop_xyxy``: the box as fractions of the image (where region boxes live)."""
    fields = cut_region(img, box, opts)
    fields["crop_xyxy"] = np.asarray(box, np.float32) / np.asarray([img.width, img.height] * 2, np.float32)
    return fields


def batch_rows(rows: Sequence[Mapping[str, np.ndarray]], buffer_size: int) -> dict[str, np.ndarray]:
    """A batch from prepared rows: crops padded into the ``buffer_size`` buffer (``batch_regions``) when
    rows carry pixels, every other field stacked."""
    batch = batch_regions(rows, buffer_size) if "pixels" in rows[0] else {}
    batch.update({key: np.stack([r[key] for r in rows]) for key in rows[0] if key not in ("pixels", *batch)})
    return batch


def train_image(image: bytes | np.ndarray, rng: np.random.Generator, opts: ImageOptions) -> dict[str, np.ndarray]:
    """Decode and draw a random resized crop (``cut_region``'s output and ``crop_xyxy``)."""
    img = to_rgb(image, opts.draft_size)
    return _cut_with_crop(img, random_crop_box(rng, img.width, img.height, opts.crop_scale, opts.crop_ratio), opts)


EVAL_CROPS = ("centre", "openclip")


def eval_image(image: bytes | np.ndarray, opts: ImageOptions, crop: bool = False) -> dict[str, np.ndarray]:
    """Decode and cut the eval crop: resize shorter side + centre crop in one box (with ``crop``, also
    ``crop_xyxy``: the box as fractions of the image).

    ``eval_crop="centre"``: the exact centred square. ``"openclip"``: OpenCLIP's
    validation transform (``openclip_crop_box``) from a full decode (no JPEG
    draft), so pretrained OpenCLIP models see the pixels they were evaluated on.
    """
    if opts.eval_crop == "openclip":
        img = to_rgb(image, None)
        box = openclip_crop_box(img.width, img.height, opts.image_size)
        if region_bounds(img.width, img.height, box, opts)[4] > 1:
            # Too large for the buffer: a box reduction first would differ from OpenCLIP's single
            # bicubic pass, so resize here as OpenCLIP does; the device's resampling is then the identity.
            img = img.resize(_openclip_resized(img.width, img.height, opts.image_size), Image.BICUBIC)
            box = openclip_crop_box(img.width, img.height, opts.image_size)
        return (_cut_with_crop if crop else cut_region)(img, box, opts)
    img = to_rgb(image, opts.draft_size)
    return (_cut_with_crop if crop else cut_region)(img, centre_crop_box(img.width, img.height), opts)
