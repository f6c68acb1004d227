"""FLIP patch masking: which image patches each example keeps during training.

The image tower takes the kept patch indices (``keep_BK``) and gathers those
patches after adding their position embeddings, so the transformer runs on K
tokens instead of P and its compute really shrinks. The class token is never
dropped. Evaluation passes no indices and sees every patch.

Dimension letters: B batch, P patches, K kept patches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches each example keeps at ``mask_ratio`` (FLIP rounds down)."""
    return int(num_patches * (1.0 - mask_ratio))


def random_keep(rng: jax.Array, batch: int, num_patches: int, num_keep: int) -> jax.Array:
    """int32 ``[B, K]``: a uniform random subset of K of the P patches per example, in ascending order.

    The subset depends only on ``rng`` and the shapes, not on the mesh.
    """
    noise_BP = jax.random.uniform(rng, (batch, num_patches))
    _, keep_BK = jax.lax.top_k(noise_BP, num_keep)
    # Ascending order keeps neighbouring patches together; attention does not care.
    return jnp.sort(keep_BK, axis=1).astype(jnp.int32)


def gather_patches(x_BPD: jax.Array, keep_BK: jax.Array) -> jax.Array:
    """``x_BPD`` restricted to each example's kept patches: ``[B, K, D]``."""
    return jnp.take_along_axis(x_BPD, keep_BK[:, :, None], axis=1)
