"""Host half of NaFlex preprocessing: native aspect ratio within a patch budget.

For a budget of L patches each image is resized, at (nearly) its own aspect
ratio, to the largest patch grid (h, w) with h * w <= L, cut into h * w
flattened ``[p*p*3]`` uint8 patches in row-major order, and padded to L
(``clipjax.models.naflex`` describes the fields). Every batch has one shape
whatever the images' sizes, so no step recompiles. Normalisation happens on the
device (``resize.normalise``), as for fixed-resolution crops. Training draws a
random crop of ``crop_scale`` of the area at the image's own aspect ratio; the
draw depends only on the example's seed, so the stream stays deterministic and
resumable.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from PIL import Image

from clipjax.data import transforms

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


@dataclasses.dataclass(frozen=True)
class NaflexOptions:
    """How an encoded image becomes NaFlex patches (host settings from ``config.data``)."""

    seq_len: int
    patch_size: int
    crop_scale: tuple[float, float] = (0.9, 1.0)
    interpolation: str = "bicubic"
    draft: bool = True
    draft_min_scale: float = 0.8

    @classmethod
    def from_config(cls, data_cfg: Any, seq_len: int, patch_size: int) -> "NaflexOptions":
        return cls(seq_len=int(seq_len), patch_size=int(patch_size),
                   crop_scale=tuple(float(v) for v in data_cfg["crop_scale"]),
                   interpolation=str(data_cfg["interpolation"]), draft=bool(data_cfg["draft_decode"]),
                   draft_min_scale=float(data_cfg["draft_min_scale"]))

    @property
    def draft_size(self) -> int | None:
        """Shorter side JPEG draft decoding keeps: a square grid's side (an image's shorter side never needs more)."""
        return math.ceil(math.isqrt(self.seq_len) * self.patch_size * self.draft_min_scale) if self.draft else None


def budget_grid(height: float, width: float, max_patches: int) -> tuple[int, int]:
    """``(rows, cols)``: the largest grid ``(ceil(s H / p), ceil(s W / p))`` with at most ``max_patches``
    cells, over scales s, in patch units (``height`` = H / p, ``width`` = W / p).

    The cell count only grows with s and only jumps where one side reaches a whole
    number, so the best s is such a point: the largest feasible rows = r (cols =
    ceil(r W / H)) or cols = c (rows = ceil(c H / W)), whichever scale is larger.
    Each side is within one patch of s H / p, s W / p: the aspect ratio is kept to a patch.
    (transformers' Siglip2 processor bisects s in floating point to within 1e-5 of this.)
    """
    if max_patches < 1 or height <= 0 or width <= 0:
        raise ValueError(f"budget_grid({height}, {width}, {max_patches}): sizes and budget must be positive")

    def largest(fits) -> int:  # largest n in [0, max_patches] with fits(n) (fits is monotone, fits(0))
        lo, hi = 0, max_patches
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo

    cols_of = lambda r: max(1, math.ceil(r * width / height - 1e-9))
    rows_of = lambda c: max(1, math.ceil(c * height / width - 1e-9))
    r = largest(lambda r: r * cols_of(r) <= max_patches)
    c = largest(lambda c: c * rows_of(c) <= max_patches)
    if r and (not c or r * width >= c * height):  # compare the scales r / H and c / W
        return r, cols_of(r)
    return rows_of(c), c


def patchify(pixels_HW3: np.ndarray, patch: int, seq_len: int) -> dict[str, np.ndarray]:
    """The NaFlex fields of a ``[h p, w p, 3]`` uint8 image: row-major patches padded to ``seq_len``."""
    h, w = pixels_HW3.shape[0] // patch, pixels_HW3.shape[1] // patch
    n = h * w
    if n > seq_len or (h * patch, w * patch) != pixels_HW3.shape[:2]:
        raise ValueError(f"an image of {pixels_HW3.shape[:2]} pixels is not a grid of at most {seq_len} "
                         f"{patch}x{patch} patches")
    out = empty_patches(seq_len, patch)
    out["patches"][:n] = pixels_HW3.reshape(h, patch, w, patch, 3).transpose(0, 2, 1, 3, 4).reshape(n, -1)
    rows, cols = np.divmod(np.arange(n, dtype=np.int32), w)
    out["patch_yx"][:n] = np.stack([rows, cols], axis=1)
    out["patch_valid"][:n] = True
    return out


def empty_patches(seq_len: int, patch: int) -> dict[str, np.ndarray]:
    """All-padding NaFlex fields (padding rows of a batch)."""
    return {"patches": np.zeros((seq_len, patch * patch * 3), np.uint8),
            "patch_yx": np.zeros((seq_len, 2), np.int32), "patch_valid": np.zeros((seq_len,), bool)}


def resize_to_budget(img: Image.Image, box: transforms.Box, opts: NaflexOptions) -> dict[str, np.ndarray]:
    """``box`` of ``img`` resized (Pillow, antialiased) to its budget grid and patchified."""
    left, top, right, bottom = box
    p = opts.patch_size
    rows, cols = budget_grid((bottom - top) / p, (right - left) / p, opts.seq_len)
    resized = img.resize((cols * p, rows * p), RESAMPLE[opts.interpolation], box=box)
    return patchify(np.asarray(resized), p, opts.seq_len)


def train_patches(image: bytes | np.ndarray, rng: np.random.Generator, opts: NaflexOptions) -> dict[str, np.ndarray]:
    """Decode, draw a random crop of ``crop_scale`` of the area at the image's own aspect ratio, patchify."""
    img = transforms.to_rgb(image, opts.draft_size)
    aspect = img.width / img.height
    box = transforms.random_crop_box(rng, img.width, img.height, opts.crop_scale, (aspect, aspect))
    return resize_to_budget(img, box, opts)


def eval_patches(image: bytes | np.ndarray, opts: NaflexOptions) -> dict[str, np.ndarray]:
    """Decode and patchify the whole image."""
    img = transforms.to_rgb(image, opts.draft_size)
    return resize_to_budget(img, (0.0, 0.0, float(img.width), float(img.height)), opts)


def image_options(data_cfg: Any, image_size: int, seq_len: int = 0,
                  patch_size: int = 0) -> transforms.ImageOptions | NaflexOptions:
    """The host image settings: NaFlex patches when ``seq_len`` > 0, else crops for ``image_size``."""
    if seq_len > 0:
        return NaflexOptions.from_config(data_cfg, seq_len, patch_size)
    return transforms.ImageOptions.from_config(data_cfg, image_size)
