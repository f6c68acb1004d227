"""The LocCa / CapPa captioning decoder: a text transformer that cross-attends to image tokens.

Each block is causal self-attention, cross-attention to the image tower's tokens
before pooling, and an MLP (``layers.Block`` with ``cross``); blocks are scanned
and rematerialised like the towers'. The decoder's vocabulary is the text
tokenizer's followed by the coordinate and task tokens (``data.locca``). Its
output layer is the input embedding transposed (``tied``) or a kernel of its own.

Dimension letters: B batch, T decoder tokens, P image tokens, D decoder width,
I image width, V decoder vocabulary.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from clipjax.models.layers import LayerNorm, Transformer, constrain, param_with_axes

Dtype = Any


class Decoder(nn.Module):
    """``(ids_BT, image_BPI, mask_BTT) -> (h_BTD, w_DV)``: final-norm features and the output kernel.

    The loss multiplies ``h_BTD`` by ``w_DV`` a vocabulary chunk at a time
    (``clipjax.vocab_loss``), so ``[B, T, V]`` logits never exist at once. ``mask_BTT``
    (True: query t may attend to key s) carries causality, parallel prediction and
    padding; None means causal. With ``decode``, ``ids_BT`` is one token per example
    (``T = 1``) at the position counted in the "cache" collection.
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    vocab_size: int
    max_length: int
    tied: bool = True
    act: str = "gelu"
    ln_eps: float = 1e-5
    remat: str = "none"
    scan: bool = True
    dtype: Dtype = jnp.float32
    decode: bool = False

    @nn.compact
    def __call__(self, ids_BT: jax.Array, image_BPI: jax.Array,
                 mask_BTT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        d, t = self.width, ids_BT.shape[1]
        if t > self.max_length:
            raise ValueError(f"decoder input length {t} exceeds model.decoder.max_length={self.max_length}")
        tok_VD = param_with_axes(self, "token_embedding", nn.initializers.normal(0.02), (self.vocab_size, d),
                                 ("vocab", "embed"))
        pos_LD = param_with_axes(self, "pos_embedding", nn.initializers.normal(0.01), (self.max_length, d),
                                 ("pos", "embed"))
        i = image_BPI.shape[-1]
        w_img = param_with_axes(self, "image_proj", nn.initializers.normal(i**-0.5), (i, d), ("embed", "mlp"))
        image_BPD = jnp.einsum("bpi,id->bpd", image_BPI.astype(self.dtype), w_img.astype(self.dtype))
        image_BPD = constrain(image_BPD, ("act_batch", "act_len", "act_embed"))
        if self.decode and not self.is_initializing():
            step = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            pos_TD = jax.lax.dynamic_slice_in_dim(pos_LD, step.value, t)
            step.value = step.value + t
        else:
            if self.decode:
                self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            pos_TD = pos_LD[:t]
        # The whole table, as in the text tower: a lookup in an embed-sharded table would
        # give embed-sharded activations (see towers.TextTower).
        x_BTD = jnp.take(constrain(tok_VD, ("vocab", None)), ids_BT, axis=0).astype(self.dtype)
        x_BTD = constrain(x_BTD + pos_TD[None].astype(self.dtype), ("act_batch", "act_len", "act_embed"))
        if mask_BTT is None and not self.decode:
            mask_BTT = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool))[None], (ids_BT.shape[0], t, t))
        x_BTD = Transformer(self.depth, self.num_heads, d // self.num_heads, self.mlp_dim, self.act, self.ln_eps,
                            causal=False, remat=self.remat, scan=self.scan, dtype=self.dtype, cross=True,
                            decode=self.decode, name="transformer")(x_BTD, mask_BTT, cross_BSD=image_BPD)
        h_BTD = LayerNorm(self.ln_eps, self.dtype, name="ln_final")(x_BTD)
        if self.tied:
            return h_BTD, tok_VD.T
        return h_BTD, param_with_axes(self, "out_kernel", nn.initializers.normal(d**-0.5), (d, self.vocab_size),
                                      ("embed", "vocab"))
