"""Transformer building blocks annotated with logical axis names only.

Dimension letters used in names: B batch, T tokens, D model width, N heads,
H head width, F MLP width, E joint embedding width.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

Dtype = Any

# Activations a block names with `checkpoint_name` (MaxText's style), in the order it computes them.
ACTIVATION_NAMES = ("query_proj", "key_proj", "value_proj", "attn_context", "attn_out", "mlp_fc", "mlp_out")

# Named remat policies: what the backward pass keeps of each block; everything else it recomputes.
REMAT_SAVES: dict[str, tuple[str, ...]] = {
    "full": (),  # nothing: the whole block forward again
    "qkv": ("query_proj", "key_proj", "value_proj"),  # the attention inputs
    "matmuls": ACTIVATION_NAMES,  # every matmul output except the T x T attention scores
}
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no rematerialisation
    **{name: jax.checkpoint_policies.save_only_these_names(*saved) for name, saved in REMAT_SAVES.items()},
    # By primitive rather than by name: every dot (the attention scores too), or those without batch dims.
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU as PyTorch computes it, x/2 (1 + erf(x/sqrt 2)).

    ``jax.nn.gelu(approximate=False)`` goes through erfc, which XLA:CPU splits into
    several passes; this is one fused pass, within 1e-6 of the float64 value.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(0.5**0.5, x.dtype)))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": quick_gelu,
}


def param_with_axes(module: nn.Module, name: str, init, shape, axes: tuple[str | None, ...], dtype=jnp.float32):
    """A parameter carrying its logical axis names (used to derive shardings)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Logical sharding constraint on an activation (a no-op without rules/mesh)."""
    return nn.with_logical_constraint(x, axes)


# flax's LayerNorm already takes its statistics in fp32 for bf16 inputs; the two-pass
# variance (not E[x^2] - E[x]^2) stays exact for large means. Params "scale"/"bias" on "norm".
LayerNorm = functools.partial(
    nn.LayerNorm, use_fast_variance=False,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


class MultiHeadAttention(nn.Module):
    """Multi-head attention through `jax.nn.dot_product_attention` (fused where available).

    ``mask_BS`` is a key mask ``[B, S]`` or a per-query mask ``[B, T, S]``. With
    ``decode`` the keys and values live in the "cache" collection: self-attention
    appends the new tokens' at the cache index; cross-attention projects its
    ``xkv_BSD`` at the first step only and reads the cache after.
    """

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    in_std: float = 0.02
    out_std: float = 0.02
    decode: bool = False

    @nn.compact
    def __call__(self, xq_BTD: jax.Array, xkv_BSD: jax.Array | None = None, *, is_causal: bool = False,
                 mask_BS: jax.Array | None = None) -> jax.Array:
        xkv_BSD = xq_BTD if xkv_BSD is None else xkv_BSD
        d = xq_BTD.shape[-1]
        n, h = self.num_heads, self.head_dim
        init_in = nn.initializers.normal(self.in_std)

        def proj(name, x):
            w = param_with_axes(self, f"{name}_kernel", init_in, (d, n, h), ("embed", "heads", "kv"))
            b = param_with_axes(self, f"{name}_bias", nn.initializers.zeros, (n, h), ("heads", "kv"))
            y = jnp.einsum("btd,dnh->btnh", x, w.astype(self.dtype)) + b.astype(self.dtype)[None, None]
            return checkpoint_name(constrain(y, ("act_batch", "act_len", "act_heads", "act_kv")), f"{name}_proj")

        q_BTNH = proj("query", xq_BTD)
        cross = xkv_BSD is not xq_BTD
        if self.decode and self.has_variable("cache", "key"):
            k_BSNH, v_BSNH, mask_BS = self._cached_kv(proj, xkv_BSD, cross, mask_BS)
            is_causal = False
        else:
            k_BSNH, v_BSNH = proj("key", xkv_BSD), proj("value", xkv_BSD)
            if self.decode:  # the first call (init) sizes the cache
                self.variable("cache", "key", jnp.zeros_like, k_BSNH)
                self.variable("cache", "value", jnp.zeros_like, v_BSNH)
                self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        mask = None if mask_BS is None else mask_BS[:, None, None, :] if mask_BS.ndim == 2 else mask_BS[:, None]
        o_BTNH = checkpoint_name(jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, mask=mask, is_causal=is_causal),
                                 "attn_context")
        w_out = param_with_axes(self, "out_kernel", nn.initializers.normal(self.out_std), (n, h, d),
                                ("heads", "kv", "embed"))
        b_out = param_with_axes(self, "out_bias", nn.initializers.zeros, (d,), ("norm",))
        y_BTD = jnp.einsum("btnh,nhd->btd", o_BTNH, w_out.astype(self.dtype)) + b_out.astype(self.dtype)[None, None]
        return checkpoint_name(constrain(y_BTD, ("act_batch", "act_len", "act_embed")), "attn_out")

    def _cached_kv(self, proj, xkv_BSD, cross: bool, mask_BS):
        """Keys, values and key mask of one decoding step, the cache updated."""
        ck, cv = self.variable("cache", "key"), self.variable("cache", "value")
        index = self.variable("cache", "index")
        i = index.value
        if cross:  # the image's keys and values do not change from step to step: project them once
            ck.value, cv.value = jax.lax.cond(i == 0, lambda: (proj("key", xkv_BSD), proj("value", xkv_BSD)),
                                              lambda: (ck.value, cv.value))
        else:  # append this step's token; the keys after it are not written yet
            ck.value = jax.lax.dynamic_update_slice_in_dim(ck.value, proj("key", xkv_BSD), i, axis=1)
            cv.value = jax.lax.dynamic_update_slice_in_dim(cv.value, proj("value", xkv_BSD), i, axis=1)
            seen_BS = jnp.broadcast_to(jnp.arange(ck.value.shape[1])[None] <= i, ck.value.shape[:2])
            mask_BS = seen_BS if mask_BS is None else mask_BS & seen_BS
        index.value = i + 1
        return ck.value, cv.value, mask_BS


class Mlp(nn.Module):
    """Two-layer MLP: D -> F -> D."""

    mlp_dim: int
    act: str = "gelu"
    dtype: Dtype = jnp.float32
    fc_std: float = 0.02
    proj_std: float = 0.02

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        d = x_BTD.shape[-1]
        w1 = param_with_axes(self, "fc_kernel", nn.initializers.normal(self.fc_std), (d, self.mlp_dim), ("embed", "mlp"))
        b1 = param_with_axes(self, "fc_bias", nn.initializers.zeros, (self.mlp_dim,), ("mlp",))
        h_BTF = jnp.einsum("btd,df->btf", x_BTD, w1.astype(self.dtype)) + b1.astype(self.dtype)[None, None]
        h_BTF = constrain(ACTIVATIONS[self.act](checkpoint_name(h_BTF, "mlp_fc")), ("act_batch", "act_len", "act_mlp"))
        w2 = param_with_axes(self, "proj_kernel", nn.initializers.normal(self.proj_std), (self.mlp_dim, d), ("mlp", "embed"))
        b2 = param_with_axes(self, "proj_bias", nn.initializers.zeros, (d,), ("norm",))
        y_BTD = jnp.einsum("btf,fd->btd", h_BTF, w2.astype(self.dtype)) + b2.astype(self.dtype)[None, None]
        return checkpoint_name(constrain(y_BTD, ("act_batch", "act_len", "act_embed")), "mlp_out")


def take_rows(x_BTD: jax.Array, index_B: jax.Array) -> jax.Array:
    """Row ``index_B[b]`` of each example: ``[B, 1, D]``."""
    return jnp.take_along_axis(x_BTD, index_B[:, None, None], axis=1)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)); x + mlp(ln(x)).

    With ``query_B`` (int32 ``[B]``) only that token's output is computed (``[B, 1, D]``):
    it attends to every key it would attend to in the full block, so its row is the
    full block's row at that index, for a fraction of the work.

    With ``cross`` (a decoder block) a cross-attention sub-layer to ``cross_BSD``
    (``[B, S, D]``: another tower's tokens) sits between self-attention and MLP;
    ``decode`` runs one token at a time with keys and values cached.
    """

    num_heads: int
    head_dim: int
    mlp_dim: int
    depth: int
    act: str = "gelu"
    ln_eps: float = 1e-5
    causal: bool = False
    dtype: Dtype = jnp.float32
    cross: bool = False
    decode: bool = False

    @nn.compact
    def __call__(self, x_BTD: jax.Array, mask_BT: jax.Array | None = None,
                 query_B: jax.Array | None = None, cross_BSD: jax.Array | None = None) -> jax.Array:
        width = x_BTD.shape[-1]
        # OpenCLIP-style init: residual branches shrink with depth.
        attn_std = width**-0.5
        out_std = width**-0.5 * (2 * self.depth) ** -0.5
        fc_std = (2 * width) ** -0.5
        y_BTD = LayerNorm(self.ln_eps, self.dtype, name="ln_attn")(x_BTD)
        attn = MultiHeadAttention(self.num_heads, self.head_dim, self.dtype, attn_std, out_std, self.decode,
                                  name="attn")
        if query_B is None:
            x_BTD = x_BTD + attn(y_BTD, is_causal=self.causal, mask_BS=mask_BT)
        else:
            if self.causal:  # the keys a causal query at position q sees: 0..q
                seen_BT = jnp.arange(x_BTD.shape[1])[None, :] <= query_B[:, None]
                mask_BT = seen_BT if mask_BT is None else mask_BT & seen_BT
            x_BTD = take_rows(x_BTD, query_B) + attn(take_rows(y_BTD, query_B), y_BTD, mask_BS=mask_BT)
        if self.cross:
            y = LayerNorm(self.ln_eps, self.dtype, name="ln_cross")(x_BTD)
            x_BTD = x_BTD + MultiHeadAttention(self.num_heads, self.head_dim, self.dtype, attn_std, out_std,
                                               self.decode, name="cross_attn")(y, cross_BSD)
        y = LayerNorm(self.ln_eps, self.dtype, name="ln_mlp")(x_BTD)
        y = Mlp(self.mlp_dim, self.act, self.dtype, fc_std, out_std, name="mlp")(y)
        x_BTD = constrain(x_BTD + y, ("act_batch", "act_len", "act_embed"))
        return x_BTD


class _ScanBlock(Block):
    """Block with the (carry, _) -> (carry, None) signature nn.scan expects."""

    @nn.compact
    def __call__(self, x_BTD, mask_BT=None, cross_BSD=None):  # type: ignore[override]
        return Block.__call__(self, x_BTD, mask_BT, cross_BSD=cross_BSD), None


class Transformer(nn.Module):
    """A stack of `depth` pre-norm blocks, scanned (fast compiles) or unrolled."""

    depth: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    act: str = "gelu"
    ln_eps: float = 1e-5
    causal: bool = False
    remat: str = "none"
    scan: bool = True
    dtype: Dtype = jnp.float32
    cross: bool = False  # decoder blocks: cross-attention to `cross_BSD` (see Block)
    decode: bool = False

    @nn.compact
    def __call__(self, x_BTD: jax.Array, mask_BT: jax.Array | None = None,
                 query_B: jax.Array | None = None, cross_BSD: jax.Array | None = None) -> jax.Array:
        """``[B, T, D]`` outputs; with ``query_B``, only the last block's row at that index (``[B, 1, D]``).

        A tower that pools one token (the class token, the end-of-text token) passes its
        index: the last block then runs its query, output projection and MLP on that row
        only, an exact shortcut (1/depth of the tower's matmuls for one token of T).
        """
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)}")
        kwargs = dict(num_heads=self.num_heads, head_dim=self.head_dim, mlp_dim=self.mlp_dim, depth=self.depth,
                      act=self.act, ln_eps=self.ln_eps, causal=self.causal, dtype=self.dtype, cross=self.cross,
                      decode=self.decode)
        block_cls = _ScanBlock if self.scan else Block
        last_cls = Block
        if self.remat != "none":
            block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan)
            last_cls = nn.remat(Block, policy=REMAT_POLICIES[self.remat])

        def scanned(length: int, **where):
            return nn.scan(block_cls, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
                           in_axes=nn.broadcast,
                           length=length, metadata_params={nn.PARTITION_NAME: "layers"})(**kwargs, **where)

        if query_B is None or self.is_initializing():  # every row of every block (init creates all the params)
            if self.scan:
                x_BTD, _ = scanned(self.depth, name="blocks")(x_BTD, mask_BT, cross_BSD)
            else:
                for i in range(self.depth):
                    x_BTD = block_cls(**kwargs, name=f"block_{i}")(x_BTD, mask_BT, cross_BSD=cross_BSD)
            return x_BTD if query_B is None else take_rows(x_BTD, query_B)
        if not self.scan:
            for i in range(self.depth - 1):
                x_BTD = block_cls(**kwargs, name=f"block_{i}")(x_BTD, mask_BT)
            return last_cls(**kwargs, name=f"block_{self.depth - 1}")(x_BTD, mask_BT, query_B)
        # The params stay one "blocks" stack: a scan over its first depth-1 layers, then the
        # last layer on its own. One split: its gradient is one concatenation.
        stack = nn.unbox(self.variables["params"]["blocks"])
        is_pair = lambda x: isinstance(x, list)
        halves = jax.tree.map(lambda a: jnp.split(a, [self.depth - 1]), stack)
        if self.depth > 1:
            head = jax.tree.map(lambda h: h[0], halves, is_leaf=is_pair)
            x_BTD, _ = scanned(self.depth - 1, parent=None).apply({"params": head}, x_BTD, mask_BT)
        last = jax.tree.map(lambda h: h[1][0], halves, is_leaf=is_pair)
        return last_cls(**kwargs, parent=None).apply({"params": last}, x_BTD, mask_BT, query_B)
