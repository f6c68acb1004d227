"""Two-tower CLIP: L2-normalised image and text embeddings, learnable scale and bias."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from clipjax.models.decoder import Decoder
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
    ``log(model.max_logit_scale)`` (``optim.clamp_logit_scale``). An optional
    captioning ``decoder`` (LocCa) is trained beside the towers; its params sit
    under "decoder" and no export of the two towers reads them.
    """

    image: ImageTower
    text: TextTower
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None
    decoder: Decoder | None = None

    def setup(self) -> None:
        self.logit_scale = param_with_axes(self, "logit_scale", nn.initializers.constant(self.init_logit_scale), (), ())
        if self.init_logit_bias is not None:
            self.logit_bias = param_with_axes(self, "logit_bias", nn.initializers.constant(self.init_logit_bias), (), ())

    def encode_image(self, images_BHWC: jax.Array, keep_BK: jax.Array | None = None) -> jax.Array:
        """Normalised image embeddings; ``keep_BK``: FLIP's kept patches (training only)."""
        return l2_normalise(self.image(images_BHWC, keep_BK))

    def encode_image_tokens(self, images_BHWC: jax.Array, keep_BK: jax.Array | None = None):
        """``(zimg_BE, tokens_BPD)``: normalised embeddings and the image tokens before pooling."""
        z_BE, tokens_BPD = self.image(images_BHWC, keep_BK, tokens=True)
        return l2_normalise(z_BE), tokens_BPD

    def decode(self, ids_BT: jax.Array, tokens_BPD: jax.Array, mask_BTT: jax.Array | None = None):
        """The decoder's ``(h_BTD, w_DV)`` on image tokens (see ``Decoder``)."""
        return self.decoder(ids_BT, tokens_BPD, mask_BTT)

    def encode_text(self, ids_BT: jax.Array) -> jax.Array:
        return l2_normalise(self.text(ids_BT))

    def scale_and_bias(self) -> tuple[jax.Array, Any]:
        bias = self.logit_bias if self.init_logit_bias is not None else None
        return jnp.exp(self.logit_scale), bias

    def __call__(self, images_BHWC: jax.Array, ids_BT: jax.Array):
        scale, bias = self.scale_and_bias()
        if self.decoder is not None and self.is_initializing():  # create the decoder's params too
            zimg, tokens_BPD = self.encode_image_tokens(images_BHWC)
            self.decode(jnp.zeros((ids_BT.shape[0], self.decoder.max_length), jnp.int32), tokens_BPD)
            return zimg, self.encode_text(ids_BT), scale, bias
        return self.encode_image(images_BHWC), self.encode_text(ids_BT), scale, bias
