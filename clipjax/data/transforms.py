"""Per-example image transforms (decode, crop, resize) and batch normalisation.

Crops are computed in source pixels and applied by one ``Image.resize(box=...)``
call, so cropping and resizing cost a single resampling pass.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from PIL import Image

from clipjax.data import images

OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in source pixels


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """How an encoded image becomes a uint8 [image_size, image_size, 3] array."""

    image_size: int
    crop_scale: tuple[float, float] = (0.9, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    draft: bool = True
    draft_min_scale: float = 0.8

    @classmethod
    def from_config(cls, data_cfg: Any, image_size: int) -> "ImageOptions":
        return cls(image_size=int(image_size), crop_scale=tuple(float(v) for v in data_cfg["crop_scale"]),
                   crop_ratio=tuple(float(v) for v in data_cfg["crop_ratio"]),
                   interpolation=str(data_cfg["interpolation"]), draft=bool(data_cfg["draft_decode"]),
                   draft_min_scale=float(data_cfg["draft_min_scale"]))

    @property
    def draft_size(self) -> int | None:
        """Smallest shorter side JPEG draft decoding may produce (None: full decode)."""
        return math.ceil(self.image_size * self.draft_min_scale) if self.draft else None


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


def crop_resize(img: Image.Image, box: Box, size: int, interpolation: str) -> np.ndarray:
    """uint8 [size, size, 3]: ``box`` of ``img`` resampled to a square."""
    out = img.resize((size, size), RESAMPLE[interpolation], box=box)
    return np.asarray(out, dtype=np.uint8)


def train_image(image: bytes | np.ndarray, rng: np.random.Generator, opts: ImageOptions) -> np.ndarray:
    """Decode, random resized crop, resize: uint8 [S, S, 3]."""
    img = to_rgb(image, opts.draft_size)
    box = random_crop_box(rng, img.width, img.height, opts.crop_scale, opts.crop_ratio)
    return crop_resize(img, box, opts.image_size, opts.interpolation)


def eval_image(image: bytes | np.ndarray, opts: ImageOptions) -> np.ndarray:
    """Decode, resize shorter side to S, centre crop: uint8 [S, S, 3]."""
    img = to_rgb(image, opts.draft_size)
    return crop_resize(img, centre_crop_box(img.width, img.height), opts.image_size, opts.interpolation)


_SCALE = (1.0 / (255.0 * np.asarray(OPENAI_STD))).astype(np.float32)
_OFFSET = (-np.asarray(OPENAI_MEAN) / np.asarray(OPENAI_STD)).astype(np.float32)


def normalise(images_u8: np.ndarray) -> np.ndarray:
    """float32 (x / 255 - mean) / std with the OpenAI CLIP statistics, channels last."""
    out = images_u8.astype(np.float32)
    out *= _SCALE
    out += _OFFSET
    return out
