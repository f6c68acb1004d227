"""The two towers: a ViT image encoder and a causal text transformer.

Dimension letters: B batch, P patches, T tokens, D width, E joint embedding.
"""

from __future__ import annotations

from typing import Any

import einops
import jax
import jax.numpy as jnp
from flax import linen as nn

from clipjax.models import naflex
from clipjax.models.layers import LayerNorm, Mlp, MultiHeadAttention, Transformer, constrain, param_with_axes
from clipjax.models.masking import gather_patches
from clipjax.models.posemb import grid_side, resample_image_pos

Dtype = Any

IMAGE_POOLS = ("tok", "gap", "map")
# "final": the sequence's final position, pad or not (SigLIP's and big_vision's "last").
TEXT_POOLS = ("eot", "last", "final")


class MapHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over the tokens."""

    num_heads: int
    mlp_dim: int
    act: str = "gelu"
    ln_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD: jax.Array, mask_BT: jax.Array | None = None) -> jax.Array:
        """``mask_BT`` (True: attend) keeps padding out of the pooling."""
        b, _, d = x_BTD.shape
        probe = param_with_axes(self, "probe", nn.initializers.normal(d**-0.5), (1, 1, d), (None, None, "embed"))
        probe_B1D = jnp.broadcast_to(probe.astype(self.dtype), (b, 1, d))
        std = d**-0.5
        attn = MultiHeadAttention(self.num_heads, d // self.num_heads, self.dtype, std, std, name="attn")
        y_B1D = attn(probe_B1D, x_BTD, mask_BS=mask_BT)
        z = LayerNorm(self.ln_eps, self.dtype, name="ln")(y_B1D)
        y_B1D = y_B1D + Mlp(self.mlp_dim, self.act, self.dtype, (2 * d) ** -0.5, std, name="mlp")(z)
        return y_B1D[:, 0]


class ImageTower(nn.Module):
    """ViT: patchify, [class token], learned positions, pre-norm blocks, final norm, pool, [project].

    SigLIP's tower: ``patch_bias=True, class_token=False, ln_pre=False, pool="map",
    proj=False`` (the pooled width is the embedding).
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    image_size: int
    embed_dim: int
    pool: str = "tok"
    class_token: bool = True
    ln_pre: bool = True
    patch_bias: bool = False
    proj: bool = True
    act: str = "gelu"
    ln_eps: float = 1e-5
    remat: str = "none"
    scan: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: Any, keep_BK: jax.Array | None = None, tokens: bool = False):
        """Embeds ``[B, H, W, C]`` images of any size divisible by the patch size, or NaFlex input.

        With ``tokens`` it returns ``(embedding_BE, tokens_BPD)``, the final-norm tokens
        before pooling too (what a captioning decoder cross-attends to).

        At another size than ``image_size`` the position table is resampled
        (``posemb.resample_image_pos``). NaFlex input (a mapping of
        ``naflex.NAFLEX_KEYS``: flattened patches, their grid coordinates, a validity
        mask) gets the table resized per image and masks padding in every attention;
        the parameters are the same. ``keep_BK`` (FLIP masking, training only) lists
        the patches each example keeps; the others are dropped after their positions
        are added, and the class token is always kept.
        """
        if self.pool not in IMAGE_POOLS:
            raise ValueError(f"model.image.pool={self.pool!r}; choose one of {IMAGE_POOLS}")
        if self.pool == "tok" and not self.class_token:
            raise ValueError("model.image.pool='tok' needs model.image.class_token=True")
        p, d = self.patch_size, self.width
        valid_BP = None  # every patch is an image patch
        if naflex.is_naflex(images):
            patches_BPK, valid_BP = images["patches"].astype(self.dtype), images["patch_valid"].astype(bool)
            b, c = patches_BPK.shape[0], 3
            if patches_BPK.shape[-1] != p * p * c:
                raise ValueError(f"NaFlex patches of {patches_BPK.shape[-1]} values; patch size {p} needs {p * p * c}")
        else:
            b, h, w, c = images.shape
            if h % p or w % p:
                raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
            patches_BPK = einops.rearrange(images.astype(self.dtype), "b (gh ph) (gw pw) c -> b (gh gw) (ph pw c)",
                                           ph=p, pw=p)  # row-major patches, each flattened row by row
        # OpenAI CLIP's patch embedding has no bias (redundant before ln_pre); SigLIP's has one.
        w_patch = param_with_axes(self, "patch_kernel", nn.initializers.normal(d**-0.5), (p * p * c, d), ("patch", "embed"))
        x_BPD = jnp.einsum("bpk,kd->bpd", patches_BPK, w_patch.astype(self.dtype))
        if self.patch_bias:
            x_BPD = x_BPD + param_with_axes(self, "patch_bias", nn.initializers.zeros, (d,), ("norm",)).astype(self.dtype)[None, None]
        if self.class_token:
            cls = param_with_axes(self, "class_token", nn.initializers.normal(d**-0.5), (d,), ("embed",))
            x_BPD = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), x_BPD], axis=1)
        # The table's shape comes from image_size, so params do not depend on the input size.
        n_cls = int(self.class_token)
        num_rows = (self.image_size // p) ** 2 + n_cls
        pos = param_with_axes(self, "pos_embedding", nn.initializers.normal(d**-0.5), (num_rows, d), ("pos", "embed"))
        if valid_BP is None:
            x_BPD = x_BPD + resample_image_pos(pos, (h // p, w // p), self.class_token).astype(self.dtype)[None]
        else:
            side, yx_BP2 = grid_side(num_rows, self.class_token), images["patch_yx"]
            pos_BPD = naflex.patch_positions(pos[n_cls:].reshape(side, side, d), yx_BP2, naflex.grid_hw(yx_BP2, valid_BP))
            pos_BPD = jnp.concatenate([jnp.broadcast_to(pos[None, :n_cls], (b, n_cls, d)), pos_BPD], axis=1)
            x_BPD = x_BPD + pos_BPD.astype(self.dtype)
        if keep_BK is not None:  # positions are in place: drop patches, never the class token
            x_BPD = jnp.concatenate([x_BPD[:, :n_cls], gather_patches(x_BPD[:, n_cls:], keep_BK)], axis=1)
            valid_BP = None if valid_BP is None else jnp.take_along_axis(valid_BP, keep_BK, axis=1)
        if valid_BP is not None and n_cls:
            valid_BP = jnp.concatenate([jnp.ones((b, n_cls), bool), valid_BP], axis=1)
        x_BPD = constrain(x_BPD, ("act_batch", "act_len", "act_embed"))
        if self.ln_pre:
            x_BPD = LayerNorm(self.ln_eps, self.dtype, name="ln_pre")(x_BPD)
        # The class token's row is all that "tok" pooling reads.
        query_B = jnp.zeros((b,), jnp.int32) if self.pool == "tok" and not tokens else None
        x_BPD = Transformer(self.depth, self.num_heads, d // self.num_heads, self.mlp_dim, self.act, self.ln_eps,
                            causal=False, remat=self.remat, scan=self.scan, dtype=self.dtype, name="transformer")(
            x_BPD, valid_BP, query_B=query_B)
        x_BPD = LayerNorm(self.ln_eps, self.dtype, name="ln_post")(x_BPD)
        tokens_BPD = x_BPD
        if self.pool == "tok":
            x_BD = x_BPD[:, 0]
        elif self.pool == "gap" and valid_BP is None:
            x_BD = jnp.mean(x_BPD[:, n_cls:], axis=1)
        elif self.pool == "gap":  # the mean of the image's own patches
            weight_BP = valid_BP.at[:, :n_cls].set(False).astype(x_BPD.dtype)
            x_BD = jnp.einsum("bpd,bp->bd", x_BPD, weight_BP) / jnp.sum(weight_BP, axis=1, keepdims=True)
        else:
            x_BD = MapHead(self.num_heads, self.mlp_dim, self.act, self.ln_eps, self.dtype, name="map_head")(
                x_BPD, valid_BP)
        if not self.proj:
            return (x_BD, tokens_BPD) if tokens else x_BD
        w_proj = param_with_axes(self, "proj", nn.initializers.normal(d**-0.5), (d, self.embed_dim), ("embed", "proj"))
        z_BE = jnp.einsum("bd,de->be", x_BD, w_proj.astype(self.dtype))
        return (z_BE, tokens_BPD) if tokens else z_BE


class TextTower(nn.Module):
    """Token + position embeddings, pre-norm transformer, final norm, pool, project.

    `pool="eot"` takes the first ``eot_id`` token (or, with ``eot_id=None``, the
    token at argmax(ids): OpenAI CLIP's end token has the largest id); `pool="last"`
    takes the last non-pad token; `pool="final"` takes position T-1 whatever it holds.
    Causal attention (or, without it, a key-padding mask) means pad tokens after
    the pooled position never change the embedding. SigLIP's tower: ``causal=False,
    pad_mask=False, pool="final", proj_bias=True`` (pads are attended to, as trained).
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    vocab_size: int
    context_length: int
    embed_dim: int
    pool: str = "eot"
    causal: bool = True
    pad_id: int = 0
    eot_id: int | None = None
    pad_mask: bool = True
    proj_bias: bool = False
    act: str = "gelu"
    ln_eps: float = 1e-5
    remat: str = "none"
    scan: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids_BT: jax.Array) -> jax.Array:
        if self.pool not in TEXT_POOLS:
            raise ValueError(f"model.text.pool={self.pool!r}; choose one of {TEXT_POOLS}")
        b, t = ids_BT.shape
        if t > self.context_length:
            raise ValueError(f"text length {t} exceeds model.text.context_length={self.context_length}")
        d = self.width
        tok = param_with_axes(self, "token_embedding", nn.initializers.normal(0.02), (self.vocab_size, d), ("vocab", "embed"))
        pos = param_with_axes(self, "pos_embedding", nn.initializers.normal(0.01), (self.context_length, d), ("pos", "embed"))
        # Look rows up in the whole table, as FSDP gathers every weight before use. A lookup in
        # the embed-sharded table yields embed-sharded activations; their gradient, sharded over
        # the batch, would then have to become embed-sharded, which XLA's SPMD partitioner can
        # only do by replicating it ("involuntary full rematerialization").
        tok = constrain(tok, ("vocab", None))
        # A shorter text (a short-context training stage) uses the first positions.
        x_BTD = jnp.take(tok, ids_BT, axis=0).astype(self.dtype) + pos[None, :t].astype(self.dtype)
        x_BTD = constrain(x_BTD, ("act_batch", "act_len", "act_embed"))
        valid_BT = ids_BT != self.pad_id
        index_B = jnp.maximum(jnp.sum(valid_BT, axis=-1) - 1, 0)
        if self.pool == "eot" and self.eot_id is None:
            index_B = jnp.argmax(ids_BT, axis=-1)
        elif self.pool == "eot":  # a text without one pools position 0, as OpenCLIP's and transformers' CLIP do
            index_B = jnp.argmax(ids_BT == self.eot_id, axis=-1)
        elif self.pool == "final":
            index_B = jnp.full((b,), t - 1)
        mask_BT = None if self.causal or not self.pad_mask else valid_BT
        # Only the pooled token's row of the last block is computed.
        x_B1D = Transformer(self.depth, self.num_heads, d // self.num_heads, self.mlp_dim, self.act, self.ln_eps,
                            causal=self.causal, remat=self.remat, scan=self.scan, dtype=self.dtype,
                            name="transformer")(x_BTD, mask_BT, query_B=index_B.astype(jnp.int32))
        x_BD = LayerNorm(self.ln_eps, self.dtype, name="ln_final")(x_B1D)[:, 0]
        w_proj = param_with_axes(self, "proj", nn.initializers.normal(d**-0.5), (d, self.embed_dim), ("embed", "proj"))
        z_BE = jnp.einsum("bd,de->be", x_BD, w_proj.astype(self.dtype))
        if self.proj_bias:
            z_BE = z_BE + param_with_axes(self, "proj_bias", nn.initializers.zeros, (self.embed_dim,),
                                          ("proj",)).astype(self.dtype)[None]
        return z_BE
