"""The device half of image preprocessing: crop-resize and normalisation, inside jit.

The host (``transforms.py``) decodes each image and ships the pixels around its
crop box as uint8, top-left in a fixed ``[P, P, 3]`` buffer, with the box and the
valid extent. Here each crop is resampled to ``[S, S]`` by two dense matmuls with
per-image filter weights built like Pillow's ``Image.resize(box=...)``: the same
kernels (bicubic a=-0.5, triangle, Lanczos-3), widened by the downscale factor
(antialiasing), taps outside the image dropped and the rest renormalised,
columns first and clipped between the passes. The result differs from Pillow's
only by Pillow's rounding to uint8 (within 2 levels, 0.3 on average; see
tests/test_resize.py). Moving this off the host leaves it only the JPEG decode;
on an accelerator the matmuls cost ~0.5 GFLOP an image at 224 px (B/16 training
costs ~100 GFLOP an image).

Batch fields (``IMAGE_KEYS``)::

    image      uint8   [B, P, P, 3]  pixels, valid in [:h, :w]
    image_box  float32 [B, 4]        crop (top, left, bottom, right) in buffer pixels
    image_hw   int32   [B, 2]        valid extent (h, w) of the buffer

or, for NaFlex (``NAFLEX_KEYS``, the host half in ``naflex.py``), uint8 flattened
patches at native aspect ratio with their grid coordinates and validity, which
only need normalising here.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

IMAGE_KEYS = ("image", "image_box", "image_hw")
NAFLEX_KEYS = ("patches", "patch_yx", "patch_valid")

OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def _bicubic(x: jax.Array) -> jax.Array:
    a, x = -0.5, jnp.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def _triangle(x: jax.Array) -> jax.Array:
    return jnp.maximum(1.0 - jnp.abs(x), 0.0)


def _lanczos3(x: jax.Array) -> jax.Array:
    return jnp.where(jnp.abs(x) < 3.0, jnp.sinc(x) * jnp.sinc(x / 3.0), 0.0)


# name -> (kernel, support radius in output-scale pixels); "nearest" has no kernel.
KERNELS: dict[str, tuple[Callable[[jax.Array], jax.Array] | None, float]] = {
    "bicubic": (_bicubic, 2.0),
    "bilinear": (_triangle, 1.0),
    "lanczos": (_lanczos3, 3.0),
    "nearest": (None, 0.5),
}


def support(interpolation: str) -> float:
    """Filter radius in source pixels per unit of downscale (what the host's crop margin must cover)."""
    return KERNELS[interpolation][1]


def axis_weights(lo: jax.Array, hi: jax.Array, valid: jax.Array, out_size: int, in_size: int,
                 interpolation: str) -> jax.Array:
    """``[out_size, in_size]`` resampling matrix for source span [lo, hi) with ``valid`` pixels."""
    return tap_weights(jnp.arange(out_size, dtype=jnp.float32), out_size, lo, hi, valid, in_size, interpolation)


def tap_weights(out_O: jax.Array, out_size, lo, hi, valid, in_size: int, interpolation: str) -> jax.Array:
    """``[O, in_size]``: the filter taps of output pixels ``out_O`` of ``out_size`` (which may be traced:
    NaFlex gathers each patch's row of an image-specific resize) over source span [lo, hi)."""
    kernel, _ = KERNELS[interpolation]
    scale = (hi - lo) / out_size
    centre_O = lo + (out_O + 0.5) * scale
    j_I = jnp.arange(in_size, dtype=jnp.float32)
    if kernel is None:  # Pillow's nearest: the source pixel under each output pixel's centre
        src_O = jnp.clip(jnp.floor(centre_O), 0, valid - 1)
        return (j_I[None, :] == src_O[:, None]).astype(jnp.float32)
    x_OI = (j_I[None, :] + 0.5 - centre_O[:, None]) / jnp.maximum(scale, 1.0)
    w_OI = jnp.where(j_I[None, :] < valid, kernel(x_OI), 0.0)
    total_O1 = jnp.sum(w_OI, axis=1, keepdims=True)
    return w_OI / jnp.where(total_O1 == 0.0, 1.0, total_O1)


def crop_resize(image_BPP3: jax.Array, box_B4: jax.Array, hw_B2: jax.Array, size: int,
                interpolation: str = "bicubic") -> jax.Array:
    """float32 ``[B, size, size, 3]`` in 0..255: each box resampled, clipped like Pillow's uint8 output.

    Rows whose box is not finite come out NaN (the train step then skips the batch).
    """
    p_h, p_w = image_BPP3.shape[1:3]
    box_B4 = box_B4.astype(jnp.float32)
    hw_B2 = hw_B2.astype(jnp.float32)
    weights = jax.vmap(axis_weights, in_axes=(0, 0, 0, None, None, None))
    wy_BSP = weights(box_B4[:, 0], box_B4[:, 2], hw_B2[:, 0], size, p_h, interpolation)
    wx_BSP = weights(box_B4[:, 1], box_B4[:, 3], hw_B2[:, 1], size, p_w, interpolation)
    hi = jax.lax.Precision.HIGHEST  # exact float32: the default may round operands to bfloat16
    # Columns first and clipped in between, as Pillow does: it matters where bicubic overshoots.
    cols_BPS3 = jnp.einsum("bsq,bpqc->bpsc", wx_BSP, image_BPP3.astype(jnp.float32), precision=hi)
    cols_BPS3 = jnp.clip(cols_BPS3, 0.0, 255.0)
    out_BSS3 = jnp.clip(jnp.einsum("btp,bpsc->btsc", wy_BSP, cols_BPS3, precision=hi), 0.0, 255.0)
    # A corrupt box must not become a black image that trains silently: NaN makes the step skip.
    finite_B111 = jnp.all(jnp.isfinite(box_B4), axis=1)[:, None, None, None]
    return jnp.where(finite_B111, out_BSS3, jnp.nan)


# model.image.norm: the pixel statistics a tower was trained with (SigLIP's map [0, 255] to [-1, 1]).
NORMS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "openai": (OPENAI_MEAN, OPENAI_STD), "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def normalise(pixels: jax.Array, norm: str = "openai") -> jax.Array:
    """(x / 255 - mean) / std with the statistics ``NORMS[norm]``, channels last."""
    shape = (1,) * (pixels.ndim - 1) + (3,)
    mean = jnp.asarray(NORMS[norm][0], jnp.float32).reshape(shape)
    std = jnp.asarray(NORMS[norm][1], jnp.float32).reshape(shape)
    return (pixels / 255.0 - mean) / std


def image_fields(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The image part of a batch: its ``NAFLEX_KEYS`` when it has them, else its ``IMAGE_KEYS``."""
    return {key: batch[key] for key in (NAFLEX_KEYS if NAFLEX_KEYS[0] in batch else IMAGE_KEYS)}


def model_images(batch: Mapping[str, jax.Array], size: int, interpolation: str = "bicubic",
                 norm: str = "openai", dtype: Any = jnp.float32) -> Any:
    """The image tower's input from a batch's image fields: ``[B, size, size, 3]`` from ``IMAGE_KEYS``,
    or from ``NAFLEX_KEYS`` the same mapping with normalised patches (zero on padding); normalised with
    ``NORMS[norm]``, in ``dtype``."""
    if NAFLEX_KEYS[0] in batch:
        patches_BLK, valid_BL = batch["patches"], batch["patch_valid"]
        pixels_BLQ3 = patches_BLK.astype(jnp.float32).reshape(*patches_BLK.shape[:2], -1, 3)
        patches_BLK = normalise(pixels_BLQ3, norm).reshape(patches_BLK.shape)
        return {**batch, "patches": jnp.where(valid_BL[..., None], patches_BLK, 0.0).astype(dtype)}
    pixels = crop_resize(batch["image"], batch["image_box"], batch["image_hw"], size, interpolation)
    return normalise(pixels, norm).astype(dtype)

