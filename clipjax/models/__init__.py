"""Pure Flax linen models: ViT image tower, text tower, two-tower CLIP head.

Params are plain pytrees; every parameter carries logical axis names that
`clipjax.sharding` maps onto the mesh.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clipjax.models.clip import CLIP, l2_normalise
from clipjax.models.decoder import Decoder
from clipjax.models.masking import num_kept, random_keep
from clipjax.models.posemb import resample_image_pos, resample_text_pos, resize_params
from clipjax.models.sizes import SIZES, get_size
from clipjax.models.towers import ImageTower, TextTower

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

__all__ = ["CLIP", "Decoder", "build_decoder", "ImageTower", "TextTower", "SIZES", "get_size", "build_model", "count_params", "l2_normalise",
           "dummy_inputs", "num_kept", "random_keep", "resample_image_pos", "resample_text_pos", "resize_params"]


def _dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r}; choose one of {list(DTYPES)}")
    return DTYPES[name]


def build_model(m) -> CLIP:
    """The CLIP module for a *validated* ``config.model`` (sizes already resolved)."""
    dtype = _dtype(m.dtype)
    common = dict(act=m.act, ln_eps=m.ln_eps, remat=m.remat, scan=m.scan, dtype=dtype)
    image = ImageTower(
        width=m.image.width, depth=m.image.depth, num_heads=m.image.heads, mlp_dim=m.image.mlp_dim,
        patch_size=m.image.patch_size, image_size=m.image.image_size, embed_dim=m.embed_dim,
        pool=m.image.pool, class_token=m.image.class_token, ln_pre=m.image.ln_pre, patch_bias=m.image.patch_bias,
        proj=m.image.proj, **common)
    text = TextTower(
        width=m.text.width, depth=m.text.depth, num_heads=m.text.heads, mlp_dim=m.text.mlp_dim,
        vocab_size=m.text.vocab_size, context_length=m.text.context_length, embed_dim=m.embed_dim,
        pool=m.text.pool, causal=m.text.causal, pad_id=m.text.pad_id, eot_id=m.text.get("eot_id"),
        pad_mask=m.text.pad_mask, proj_bias=m.text.proj_bias, **common)
    return CLIP(image=image, text=text, init_logit_scale=m.init_logit_scale, init_logit_bias=m.init_logit_bias,
                decoder=build_decoder(m))


def build_decoder(m, decode: bool = False) -> Decoder | None:
    """The captioning decoder of a validated ``config.model`` (None when ``model.decoder.enabled`` is off)."""
    d = m.get("decoder")
    if d is None or not d.enabled:
        return None
    return Decoder(width=d.width, depth=d.depth, num_heads=d.heads, mlp_dim=d.mlp_dim, vocab_size=d.vocab_size,
                   max_length=d.max_length, tied=d.tied, act=m.act, ln_eps=m.ln_eps, remat=m.remat, scan=m.scan,
                   dtype=_dtype(m.dtype), decode=decode)


def dummy_inputs(m, batch: int = 1) -> tuple[jax.Array, jax.Array]:
    """Zero images and token ids with the shapes ``config.model`` expects."""
    s = m.image.image_size
    return (jnp.zeros((batch, s, s, 3), jnp.float32), jnp.zeros((batch, m.text.context_length), jnp.int32))


def count_params(params: Any) -> int:
    """Total number of scalars in a (possibly abstract or boxed) parameter tree."""
    from flax import linen as nn

    leaves = jax.tree.leaves(nn.unbox(params))
    return int(sum(int(np.prod(x.shape)) for x in leaves))
