"""Two-tower CLIP: L2-normalised image and text embeddings, learnable scale and bias."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from clipjax.models.layers import param_with_axes
from clipjax.models.towers import ImageTower, TextTower


def l2_normalise(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / ||x||, with the norm computed in fp32."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.maximum(jnp.sum(x32 * x32, axis=-1, keepdims=True), eps * eps))).astype(x.dtype)


class CLIP(nn.Module):
    """Image tower + text tower + log-scale (+ optional bias for the sigmoid loss).

    ``__call__(images_BHWC, ids_BT)`` returns ``(zimg_BE, ztxt_BE, scale, bias)``:
    normalised embeddings, ``scale = exp(logit_scale)`` and the bias (``None`` when
    the model has none). The train step keeps ``logit_scale`` at most
    ``log(model.max_logit_scale)`` (``optim.clamp_logit_scale``).
    """

    image: ImageTower
    text: TextTower
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None

    def setup(self) -> None:
        self.logit_scale = param_with_axes(self, "logit_scale", nn.initializers.constant(self.init_logit_scale), (), ())
        if self.init_logit_bias is not None:
            self.logit_bias = param_with_axes(self, "logit_bias", nn.initializers.constant(self.init_logit_bias), (), ())

    def encode_image(self, images_BHWC: jax.Array) -> jax.Array:
        return l2_normalise(self.image(images_BHWC))

    def encode_text(self, ids_BT: jax.Array) -> jax.Array:
        return l2_normalise(self.text(ids_BT))

    def scale_and_bias(self) -> tuple[jax.Array, Any]:
        bias = self.logit_bias if self.init_logit_bias is not None else None
        return jnp.exp(self.logit_scale), bias

    def __call__(self, images_BHWC: jax.Array, ids_BT: jax.Array):
        scale, bias = self.scale_and_bias()
        return self.encode_image(images_BHWC), self.encode_text(ids_BT), scale, bias
