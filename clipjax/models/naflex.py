"""NaFlex input of the image tower: flattened patches at native aspect ratio, padded to L.

The host (``clipjax.data.naflex``) resizes each image to a patch grid (h, w) with
h * w <= L at about its own aspect ratio and ships ``NAFLEX_KEYS``::

    patches      [B, L, p*p*C]  flattened (py, px, c) patches, row-major over the grid
    patch_yx     int32 [B, L, 2] each patch's (row, column) in its image's grid
    patch_valid  bool [B, L]     False on padding

The tower adds the learned G x G position grid resized to each image's (h, w)
(bilinear with antialiasing, as transformers' ``Siglip2VisionEmbeddings`` and
big_vision's ``naflex_vit`` do), looked up at each patch's coordinates, and masks
padding out of every attention (the MAP head's included). One image's embedding
does not depend on how much padding follows it.

Dimension letters: B batch, L patches, G position grid side, D width, K kept patches.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from clipjax.data.resize import NAFLEX_KEYS, tap_weights
from clipjax.models.masking import num_kept

__all__ = ["NAFLEX_KEYS", "grid_hw", "is_naflex", "patch_positions", "random_keep_valid"]


def is_naflex(images: Any) -> bool:
    """Whether a tower input is NaFlex (a mapping of ``NAFLEX_KEYS``) rather than ``[B, H, W, C]`` pixels."""
    return isinstance(images, Mapping)


def grid_hw(yx_BL2: jax.Array, valid_BL: jax.Array) -> jax.Array:
    """int32 ``[B, 2]``: each image's grid (rows, columns), read off its valid patches' coordinates."""
    last_BL2 = jnp.where(valid_BL[..., None], yx_BL2, 0)
    return jnp.max(last_BL2, axis=1).astype(jnp.int32) + 1


def patch_positions(pos_GGD: jax.Array, yx_BL2: jax.Array, hw_B2: jax.Array) -> jax.Array:
    """float32 ``[B, L, D]``: the ``[G, G, D]`` grid resized to each image's ``hw_B2`` grid, at ``yx_BL2``.

    Resizing is separable and linear, so a patch's position is the grid weighted by the
    outer product of its row's and its column's taps: a ``[B, L, G*G] @ [G*G, D]`` matmul,
    never an image-sized table. Taps are ``F.interpolate(mode="bilinear", antialias=True,
    align_corners=False)``'s, i.e. Pillow's triangle filter widened when shrinking.
    """
    g = pos_GGD.shape[0]
    hw_BL2 = jnp.broadcast_to(hw_B2[:, None, :], yx_BL2.shape).astype(jnp.float32)
    taps = jax.vmap(lambda out, size: tap_weights(out, size, 0.0, float(g), float(g), g, "bilinear")[0])
    flat = lambda a: a.reshape(-1, 1)
    wy_NG = taps(flat(yx_BL2[..., 0].astype(jnp.float32)), hw_BL2[..., 0].reshape(-1))
    wx_NG = taps(flat(yx_BL2[..., 1].astype(jnp.float32)), hw_BL2[..., 1].reshape(-1))
    w_BLQ = (wy_NG[:, :, None] * wx_NG[:, None, :]).reshape(*yx_BL2.shape[:2], g * g)
    # Exact float32: the default may round the taps to bfloat16 on accelerators.
    return jnp.einsum("blq,qd->bld", w_BLQ, pos_GGD.reshape(g * g, -1).astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


def random_keep_valid(rng: jax.Array, valid_BL: jax.Array, mask_ratio: float) -> jax.Array:
    """int32 ``[B, K]`` (K = ``num_kept(L, mask_ratio)``): FLIP's kept patches of padded NaFlex examples.

    Each example keeps ``max(1, floor(n_valid * (1 - mask_ratio)))`` of its own patches,
    uniformly at random; its other K slots take padding, which stays masked. So the
    drop ratio applies to the image, not to its padding, and no image patch is kept
    beyond its share. (K - kept <= padding count always holds: floor(a) - floor(b) <= a - b
    rounded up.)
    """
    b, length = valid_BL.shape
    k = num_kept(length, mask_ratio)
    noise_BL = jax.random.uniform(rng, (b, length))
    rank_BL = jnp.argsort(jnp.argsort(jnp.where(valid_BL, noise_BL, 2.0), axis=1), axis=1)
    n_valid_B1 = jnp.sum(valid_BL, axis=1, keepdims=True)
    n_keep_B1 = jnp.maximum(1, jnp.floor(n_valid_B1 * (1.0 - mask_ratio))).astype(jnp.int32)
    kept_BL = valid_BL & (rank_BL < n_keep_B1)
    # Kept patches first, then padding, then dropped patches (never reached, see above).
    key_BL = jnp.where(kept_BL, 0.0, jnp.where(valid_BL, 2.0, 1.0)) + noise_BL
    keep_BK = jnp.argsort(key_BL, axis=1)[:, :k]
    return jnp.sort(keep_BK, axis=1).astype(jnp.int32)
