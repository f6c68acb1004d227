"""The jitted embedding passes of evaluation, and host <-> global array hand-over.

Each pass is jitted once per ``Encoders`` (fixed batch shapes), takes batches
sharded over the mesh's batch axes and returns float32 embeddings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from clipjax.data import resize
from clipjax.evals import zeroshot as zeroshot_lib
from clipjax.models import CLIP


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as a numpy array on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def put_global(x: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array present on every process as a global array with ``sharding``."""
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


class Encoders:
    """``image(params, crops)``, ``text(params, ids)``, ``zeroshot(...)`` and ``retrieval(...)`` passes of a CLIP model."""

    def __init__(self, model: CLIP, model_cfg, interpolation: str):
        dtype, image_size = jnp.dtype(model_cfg.dtype), model_cfg.image.image_size

        def encode_image(params, crops):
            images = resize.model_images(crops, image_size, interpolation, model_cfg.image.get("norm", "openai"),
                                         dtype)
            return model.apply({"params": params}, images, method=CLIP.encode_image).astype(jnp.float32)

        def encode_text(params, ids):
            return model.apply({"params": params}, ids, method=CLIP.encode_text).astype(jnp.float32)

        def zeroshot(params, crops, labels, mask, zcls):
            """Rank of the true class per image (and labels, mask passed through)."""
            return zeroshot_lib.zeroshot_ranks(encode_image(params, crops), zcls, labels), labels, mask

        def retrieval(params, crops, text, mask, text_mask):
            """Image embeddings [b, E] and caption embeddings [b, K, E] (and masks passed through)."""
            b, k, length = text.shape
            ztxt = encode_text(params, text.reshape(b * k, length))
            return encode_image(params, crops), ztxt.reshape(b, k, -1), mask, text_mask

        self.image, self.text = jax.jit(encode_image), jax.jit(encode_text)
        self.zeroshot, self.retrieval = jax.jit(zeroshot), jax.jit(retrieval)
