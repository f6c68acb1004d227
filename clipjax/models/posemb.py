"""Position embeddings at another image size or text length.

A ViT's learned positions form a grid of patch positions (after the class
token's row, when there is one); at another image size the grid is resampled
with ``jax.image.resize`` (bicubic by default), the class row kept as it is.
Text positions are a sequence: a shorter context keeps the first positions
(exactly what the model uses for short texts), a longer one is resampled
linearly. Resampling to the same size returns the input unchanged, so a model
at its own size computes exactly what it did before.

Dimension letters: T tokens (rows of the table), G grid side, D width.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

GRID_METHODS = ("bicubic", "bilinear", "lanczos3", "nearest")


def grid_side(num_rows: int, class_token: bool) -> int:
    """Side of the square patch grid of an image position table with ``num_rows`` rows."""
    n = num_rows - int(class_token)
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"image position table has {n} patch rows, not a square grid")
    return side


def resample_image_pos(pos_TD: jax.Array, grid: tuple[int, int], class_token: bool,
                       method: str = "bicubic") -> jax.Array:
    """The image position table for a ``grid`` (rows, cols) of patches.

    ``pos_TD`` is ``[cls?, G*G, D]`` for a square grid; the class row is kept.
    Differentiable, so a model can train its full-size table at a smaller size.
    """
    if method not in GRID_METHODS:
        raise ValueError(f"position resampling method {method!r}; choose one of {GRID_METHODS}")
    side = grid_side(pos_TD.shape[0], class_token)
    if tuple(grid) == (side, side):
        return pos_TD
    cls_D = pos_TD[:1] if class_token else pos_TD[:0]
    patches_GGD = pos_TD[int(class_token):].reshape(side, side, pos_TD.shape[-1])
    # Resample in float32: a bf16 table would lose the small differences between neighbours.
    out = jax.image.resize(patches_GGD.astype(jnp.float32), (*grid, pos_TD.shape[-1]), method=method, antialias=True)
    return jnp.concatenate([cls_D, out.reshape(grid[0] * grid[1], -1).astype(pos_TD.dtype)], axis=0)


def resample_text_pos(pos_TD: jax.Array, length: int) -> jax.Array:
    """The text position table for ``length`` tokens: the first rows, or a linear resampling when longer."""
    if length <= pos_TD.shape[0]:
        return pos_TD[:length]
    out = jax.image.resize(pos_TD.astype(jnp.float32), (length, pos_TD.shape[-1]), method="linear")
    return out.astype(pos_TD.dtype)


def resize_params(params: Any, shapes: Any, method: str = "bicubic") -> Any:
    """``params`` with both towers' position tables resampled to the shapes in ``shapes``.

    ``shapes`` is a tree with the same structure holding arrays or ShapeDtypeStructs
    (e.g. the abstract params of the model at its new size); every other
    parameter must already have its shape. Works on numpy or jax arrays; the
    image table has a class row when ``shapes["image"]`` has a ``class_token``.
    """
    out = jax.tree.map(lambda x: x, params)  # a copy of the containers; leaves are shared
    for tower in ("image", "text"):
        if tower not in params or "pos_embedding" not in params[tower]:
            continue
        pos, want = params[tower]["pos_embedding"], shapes[tower]["pos_embedding"].shape
        if pos.shape == tuple(want):
            continue
        if pos.shape[1:] != tuple(want[1:]):
            raise ValueError(f"{tower} position table width {pos.shape[1:]} cannot become {tuple(want[1:])}")
        if tower == "image":
            class_token = "class_token" in shapes["image"]
            side = grid_side(want[0], class_token)
            out[tower]["pos_embedding"] = resample_image_pos(jnp.asarray(pos), (side, side), class_token, method)
        else:
            out[tower]["pos_embedding"] = resample_text_pos(jnp.asarray(pos), want[0])
    return out
