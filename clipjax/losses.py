"""Contrastive losses over a global batch sharded along B: one API, four implementations.

``contrastive_loss(zimg, ztxt, scale, bias, kind=..., impl=..., mesh=...) -> (loss, metrics)``

Logits are ``L_ij = scale * <zimg_i, ztxt_j> + bias`` (bias only for sigmoid).

kinds
  softmax  symmetric InfoNCE: ``(sum_i [lse_j L_ij - L_ii] + sum_j [lse_i L_ij - L_jj]) / 2B``.
  sigmoid  SigLIP: ``sum_ij softplus(-z_ij L_ij) / B`` with z = +1 on the diagonal, -1 elsewhere.

impls (all exact; they differ in memory and communication)
  dense      the global [B, B] matrix; the reference.
  allgather  each device gathers the text embeddings and computes its rows [b, B];
             autodiff through the gather.
  chunked    as allgather, but logits are streamed in [b, c] tiles (online
             log-sum-exp) and a custom VJP recomputes the tiles: logits memory O(b c).
  ring       text chunks travel round the ring with ``ppermute`` while each device
             sweeps its rows against them; column statistics (forward) and column
             gradients (backward) travel with the chunk and arrive home after one
             lap. No device ever holds [B, E].

Every implementation makes one pass: local image rows against all text columns.
Row statistics stay local; column statistics (the text-to-image log-sum-exp and
the accuracy maxima) are merged across devices (allgather, chunked) or carried
round the ring. In-batch top-1 accuracy counts a pair right when the best match
has the query's text key (``text_keys``): a caption identical to the positive is
right too. Because rows and columns share indices, device k owns rows and
columns ``k*b ... (k+1)*b - 1`` and finishes both halves of its loss terms.

Dimension letters: B global batch, b local batch (B / n over n batch shards),
E embedding width, c column tile, r rows of a tile.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from clipjax import sharding

KINDS = ("softmax", "sigmoid")
IMPLS = ("dense", "allgather", "chunked", "ring")
# Upper bound for one fp32 logits tile when chunk_size is not given.
TILE_BYTES = 4 * 2**20

Stats = dict[str, jax.Array]


# --------------------------------------------------------------------------- tiles


def _init_stats(size: int, kind: str, rows: bool) -> Stats:
    """Running statistics for ``size`` rows (or columns) of the logits."""
    neg_inf = jnp.full((size,), -jnp.inf, jnp.float32)
    zeros = jnp.zeros((size,), jnp.float32)
    # Top-1 accuracy: max logit over pairs with the same text key (pos) and with another (off).
    st = {"posmax": neg_inf, "offmax": neg_inf}
    if rows:
        st["diag"] = zeros  # the positive logit L_ii
    if kind == "softmax":
        st["m"], st["s"] = neg_inf, zeros  # online log-sum-exp: lse = m + log(s)
    elif rows:
        st["loss"] = zeros  # sum_j softplus(-z_ij L_ij)
    return st


def _lse_update(m: jax.Array, s: jax.Array, logits: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    # The running max only stabilises; lse is exact whatever it is, so it carries no gradient.
    m_new = jnp.maximum(m, jax.lax.stop_gradient(jnp.max(logits, axis=axis)))
    e = jnp.exp(logits - jnp.expand_dims(m_new, axis))
    return m_new, s * jnp.exp(m - m_new) + jnp.sum(e, axis=axis)


def _logits(q_rE, k_cE, scale, bias):
    sims_rc = jnp.einsum("re,ce->rc", q_rE, k_cE, preferred_element_type=jnp.float32)
    return sims_rc, scale * sims_rc + bias


def _tile_fwd(kind: str, q_rE, k_cE, row_ids, col_ids, row_keys, col_keys, scale, bias, row: Stats,
              col: Stats) -> tuple[Stats, Stats]:
    """Folds the logits tile ``q k^T`` into the row and column statistics."""
    _, logits = _logits(q_rE, k_cE, scale, bias)
    diag = row_ids[:, None] == col_ids[None, :]
    same = row_keys[:, None] == col_keys[None, :]
    plain = jax.lax.stop_gradient(logits)
    pos, off = jnp.where(same, plain, -jnp.inf), jnp.where(same, -jnp.inf, plain)
    row, col = dict(row), dict(col)
    for st, axis in ((row, 1), (col, 0)):
        st["posmax"] = jnp.maximum(st["posmax"], jnp.max(pos, axis=axis))
        st["offmax"] = jnp.maximum(st["offmax"], jnp.max(off, axis=axis))
    row["diag"] = row["diag"] + jnp.sum(jnp.where(diag, logits, 0.0), axis=1)
    if kind == "softmax":
        row["m"], row["s"] = _lse_update(row["m"], row["s"], logits, 1)
        col["m"], col["s"] = _lse_update(col["m"], col["s"], logits, 0)
    else:
        z = jnp.where(diag, 1.0, -1.0)
        row["loss"] = row["loss"] + jnp.sum(jax.nn.softplus(-z * logits), axis=1)
    return row, col


def _tile_bwd(kind: str, q_rE, k_cE, lse_c, row_ids, col_ids, scale, bias, lse_r, w):
    """Gradients of ``w * loss`` from one recomputed tile: (dq, dk, dscale, dbias)."""
    sims, logits = _logits(q_rE, k_cE, scale, bias)
    diag = (row_ids[:, None] == col_ids[None, :]).astype(jnp.float32)
    if kind == "softmax":
        g = w * (jnp.exp(logits - lse_r[:, None]) + jnp.exp(logits - lse_c[None, :]) - 2.0 * diag)
    else:
        z = 2.0 * diag - 1.0
        g = -w * z * jax.nn.sigmoid(-z * logits)
    dq = scale * jnp.einsum("rc,ce->re", g.astype(k_cE.dtype), k_cE, preferred_element_type=jnp.float32)
    dk = scale * jnp.einsum("rc,re->ce", g.astype(q_rE.dtype), q_rE, preferred_element_type=jnp.float32)
    return dq, dk, jnp.sum(g * sims), jnp.sum(g)


def _finish(kind: str, row: Stats, col: Stats, batch: int) -> tuple[jax.Array, Stats]:
    """Local partial loss and per-row results once rows and columns have seen every tile.

    ``row`` and ``col`` describe the same indices (this device's rows and columns).
    """
    out = {
        "i2t_correct": jnp.sum(row["posmax"] > row["offmax"]),
        "t2i_correct": jnp.sum(col["posmax"] > col["offmax"]),
    }
    if kind == "softmax":
        out["lse_r"] = row["m"] + jnp.log(row["s"])
        out["lse_c"] = col["m"] + jnp.log(col["s"])
        partial = jnp.sum(out["lse_r"] + out["lse_c"] - 2.0 * row["diag"]) / (2 * batch)
    else:
        partial = jnp.sum(row["loss"]) / batch
    return partial, out


def _sweep(tile_fn: Callable, row_carry: Any, k_blocks: tuple, col_carry: Any, col0, c: int):
    """Runs ``tile_fn`` over the columns of ``k_blocks`` in tiles of ``c``.

    ``tile_fn(row_carry, k_tiles, col_tiles, col_start) -> (row_carry, col_tiles)``;
    ``col_carry`` leaves are per-column arrays updated in place tile by tile.
    """
    width = k_blocks[0].shape[0]

    def body(t, carry):
        row_carry, col_carry = carry
        start = t * c
        k_tiles = tuple(jax.lax.dynamic_slice_in_dim(k, start, c) for k in k_blocks)
        col_tiles = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, c), col_carry)
        row_carry, col_tiles = tile_fn(row_carry, k_tiles, col_tiles, col0 + start)
        col_carry = jax.tree.map(lambda a, u: jax.lax.dynamic_update_slice_in_dim(a, u, start, 0), col_carry,
                                 col_tiles)
        return row_carry, col_carry

    return jax.lax.fori_loop(0, width // c, body, (row_carry, col_carry))


# --------------------------------------------------------------------------- metrics


def _similarity_metrics(x_bE, y_bE, batch: int, axes) -> dict[str, jax.Array]:
    """Mean positive and negative cosine similarity from per-device sums (no logits needed)."""
    x, y = x_bE.astype(jnp.float32), y_bE.astype(jnp.float32)
    pos = jnp.sum(x * y)
    sx, sy = jnp.sum(x, axis=0), jnp.sum(y, axis=0)
    if axes:
        pos, sx, sy = jax.lax.psum((pos, sx, sy), axes)
    neg = (jnp.dot(sx, sy) - pos) / float(max(batch * (batch - 1), 1))
    return {"pos_sim": pos / batch, "neg_sim": neg}


def _metrics(partial_loss, out: Stats, x, y, batch: int, axes) -> tuple[jax.Array, dict[str, jax.Array]]:
    correct = (out["i2t_correct"], out["t2i_correct"])
    if axes:
        partial_loss, correct = jax.lax.psum((partial_loss, correct), axes)
    metrics = {"i2t_acc": correct[0] / batch, "t2i_acc": correct[1] / batch}
    metrics.update(_similarity_metrics(x, y, batch, axes))
    return partial_loss, jax.lax.stop_gradient(metrics)


# --------------------------------------------------------------------------- impls


def _dense(kind, x, y, keys, scale, bias):
    batch = x.shape[0]
    ids = jnp.arange(batch)
    row, col = _tile_fwd(kind, x, y, ids, ids, keys, keys, scale, bias, _init_stats(batch, kind, True),
                         _init_stats(batch, kind, False))
    partial, out = _finish(kind, row, col, batch)
    return _metrics(partial, out, x, y, batch, ())


def _merge_cols(kind: str, col_B: Stats, idx, b: int, axes) -> Stats:
    """Combines every device's statistics of all B columns; returns this device's b columns."""
    local = lambda a: jax.lax.dynamic_slice_in_dim(a, idx * b, b)
    out = {k: local(jax.lax.pmax(col_B[k], axes)) for k in ("posmax", "offmax")}
    if kind == "softmax":
        m = jax.lax.pmax(jax.lax.stop_gradient(col_B["m"]), axes)
        out["s"] = jax.lax.psum_scatter(col_B["s"] * jnp.exp(col_B["m"] - m), axes, tiled=True)
        out["m"] = local(m)
    return out


def _local_rows(axes, x_bE) -> tuple[int, jax.Array, jax.Array]:
    """(b, this device's index along the batch axes, global ids of its rows)."""
    b = x_bE.shape[0]
    idx = jax.lax.axis_index(axes)
    return b, idx, idx * b + jnp.arange(b)


def _zero_grads(x_bE) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Accumulators for (dx, dscale, dbias)."""
    return jnp.zeros(x_bE.shape, jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)


def _allgather_body(kind, axes, batch, x_bE, y_bE, key_b, scale, bias):
    b, idx, row_ids = _local_rows(axes, x_bE)
    y_BE, key_B = jax.lax.all_gather((y_bE, key_b), axes, tiled=True)
    row, col_B = _tile_fwd(kind, x_bE, y_BE, row_ids, jnp.arange(batch), key_b, key_B, scale, bias,
                           _init_stats(b, kind, True), _init_stats(batch, kind, False))
    partial, out = _finish(kind, row, _merge_cols(kind, col_B, idx, b, axes), batch)
    return _metrics(partial, out, x_bE, y_bE, batch, axes)


def _fwd_tile_fn(kind, x_bE, row_ids, row_keys, scale, bias):
    def tile_fn(row, k_tiles, col, col_start):
        y_cE, col_keys = k_tiles
        col_ids = col_start + jnp.arange(y_cE.shape[0])
        return _tile_fwd(kind, x_bE, y_cE, row_ids, col_ids, row_keys, col_keys, scale, bias, row, col)

    return tile_fn


def _bwd_tile_fn(kind, x_bE, row_ids, scale, bias, lse_r, w):
    def tile_fn(acc, k_tiles, dy_cE, col_start):
        y_cE, lse_c = k_tiles
        col_ids = col_start + jnp.arange(y_cE.shape[0])
        dx, dy, ds, db = _tile_bwd(kind, x_bE, y_cE, lse_c, row_ids, col_ids, scale, bias, lse_r, w)
        acc = jax.tree.map(jnp.add, acc, (dx, ds, db))
        return acc, dy_cE + dy

    return tile_fn


def _loss_weight(kind: str, batch: int, g):
    return g / (2 * batch) if kind == "softmax" else g / batch


def _chunked_fwd_body(kind, axes, batch, c, x_bE, y_bE, key_b, scale, bias):
    b, idx, row_ids = _local_rows(axes, x_bE)
    y_BE, key_B = jax.lax.all_gather((y_bE, key_b), axes, tiled=True)
    row, col_B = _sweep(_fwd_tile_fn(kind, x_bE, row_ids, key_b, scale, bias), _init_stats(b, kind, True),
                        (y_BE, key_B),
                        _init_stats(batch, kind, False), 0, c)
    partial, out = _finish(kind, row, _merge_cols(kind, col_B, idx, b, axes), batch)
    loss, metrics = _metrics(partial, out, x_bE, y_bE, batch, axes)
    return loss, metrics, _residual_stats(kind, out, b)


def _chunked_bwd_body(kind, axes, batch, c, x_bE, y_bE, scale, bias, res, g):
    _, _, row_ids = _local_rows(axes, x_bE)
    y_BE = jax.lax.all_gather(y_bE, axes, tiled=True)
    lse_cB = jax.lax.all_gather(res["lse_c"], axes, tiled=True)
    tile_fn = _bwd_tile_fn(kind, x_bE, row_ids, scale, bias, res["lse_r"], _loss_weight(kind, batch, g))
    (dx, ds, db), dy_BE = _sweep(tile_fn, _zero_grads(x_bE), (y_BE, lse_cB), jnp.zeros(y_BE.shape, jnp.float32), 0,
                                 c)
    dy = jax.lax.psum_scatter(dy_BE, axes, tiled=True)
    ds, db = jax.lax.psum((ds, db), axes)
    return dx.astype(x_bE.dtype), dy.astype(y_bE.dtype), ds, db


def _ring_loop(n: int, axes, idx, b: int, c: int, tile_fn, row_carry, k_blocks: tuple, col_carry):
    """One lap of the ring: each step sweeps the chunk in hand, then passes it on.

    Read-only blocks (``k_blocks``) are sent before the sweep so the transfer
    overlaps the computation; the column accumulators (``col_carry``) are sent
    after it and, after n sends, are back on the device that owns them.
    """
    perm = [(i, (i + 1) % n) for i in range(n)]
    send = lambda tree: jax.tree.map(lambda a: jax.lax.ppermute(a, axes, perm), tree)

    def sweep(row_carry, k_blocks, col_carry, t):
        src = (idx - t) % n  # the chunk in hand started on device src
        return _sweep(tile_fn, row_carry, k_blocks, col_carry, src * b, c)

    def body(carry, t):
        row_carry, k_blocks, col_carry = carry
        k_next = send(k_blocks)
        row_carry, col_carry = sweep(row_carry, k_blocks, col_carry, t)
        return (row_carry, k_next, send(col_carry)), None

    (row_carry, k_blocks, col_carry), _ = jax.lax.scan(body, (row_carry, k_blocks, col_carry), jnp.arange(n - 1))
    row_carry, col_carry = sweep(row_carry, k_blocks, col_carry, n - 1)
    return row_carry, send(col_carry) if n > 1 else col_carry


def _ring_fwd_body(kind, axes, batch, c, x_bE, y_bE, key_b, scale, bias):
    b, idx, row_ids = _local_rows(axes, x_bE)
    row, col = _ring_loop(batch // b, axes, idx, b, c, _fwd_tile_fn(kind, x_bE, row_ids, key_b, scale, bias),
                          _init_stats(b, kind, True), (y_bE, key_b), _init_stats(b, kind, False))
    partial, out = _finish(kind, row, col, batch)
    loss, metrics = _metrics(partial, out, x_bE, y_bE, batch, axes)
    return loss, metrics, _residual_stats(kind, out, b)


def _ring_bwd_body(kind, axes, batch, c, x_bE, y_bE, scale, bias, res, g):
    b, idx, row_ids = _local_rows(axes, x_bE)
    tile_fn = _bwd_tile_fn(kind, x_bE, row_ids, scale, bias, res["lse_r"], _loss_weight(kind, batch, g))
    (dx, ds, db), dy = _ring_loop(batch // b, axes, idx, b, c, tile_fn, _zero_grads(x_bE), (y_bE, res["lse_c"]),
                                  jnp.zeros(y_bE.shape, jnp.float32))
    ds, db = jax.lax.psum((ds, db), axes)
    return dx.astype(x_bE.dtype), dy.astype(y_bE.dtype), ds, db


def _residual_stats(kind: str, out: Stats, b: int) -> Stats:
    """Per-row statistics the backward pass needs (the log-sum-exps; dummies for sigmoid)."""
    if kind == "softmax":
        return {"lse_r": out["lse_r"], "lse_c": out["lse_c"]}
    zeros = jnp.zeros((b,), jnp.float32)
    return {"lse_r": zeros, "lse_c": zeros}


@functools.lru_cache(maxsize=None)
def _streaming(kind: str, impl: str, mesh: Mesh, axes: tuple[str, ...], batch: int, c: int):
    """The chunked or ring loss as a custom-VJP function of global arrays."""
    fwd_body, bwd_body = {
        "chunked": (_chunked_fwd_body, _chunked_bwd_body),
        "ring": (_ring_fwd_body, _ring_bwd_body),
    }[impl]
    rows, rep = P(axes, None), P()
    res_spec = {"lse_r": P(axes), "lse_c": P(axes)}
    shard = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)
    fwd_sharded = shard(functools.partial(fwd_body, kind, axes, batch, c), in_specs=(rows, rows, P(axes), rep, rep),
                        out_specs=(rep, rep, res_spec))
    bwd_sharded = shard(functools.partial(bwd_body, kind, axes, batch, c),
                        in_specs=(rows, rows, rep, rep, res_spec, rep), out_specs=(rows, rows, rep, rep))

    @jax.custom_vjp
    def loss_fn(x, y, keys, scale, bias):
        loss, metrics, _ = fwd_sharded(x, y, keys, scale, bias)
        return loss, metrics

    def fwd(x, y, keys, scale, bias):
        loss, metrics, res = fwd_sharded(x, y, keys, scale, bias)
        return (loss, metrics), (x, y, scale, bias, res)

    def bwd(saved, cotangents):
        x, y, scale, bias, res = saved
        g, _ = cotangents
        dx, dy, ds, db = bwd_sharded(x, y, scale, bias, res, g)
        return dx, dy, None, ds, db

    loss_fn.defvjp(fwd, bwd)
    return loss_fn


# --------------------------------------------------------------------------- API


def default_chunk_size(rows: int, cols: int) -> int:
    """Largest divisor of ``cols`` whose [rows, c] fp32 tile fits in TILE_BYTES."""
    limit = max(1, TILE_BYTES // (4 * rows))
    return max(d for d in range(1, min(cols, limit) + 1) if cols % d == 0)


def text_keys(ids_BL: jax.Array) -> jax.Array:
    """A [B] int32 hash of each token sequence: equal for identical captions (polynomial, mod 2^32)."""
    length = ids_BL.shape[1]
    powers_L = np.array([pow(1000003, length - 1 - l, 2**32) for l in range(length)], np.uint32)
    h_B = jnp.sum(ids_BL.astype(jnp.uint32) * powers_L[None, :], axis=1, dtype=jnp.uint32)  # wraps mod 2^32
    return jax.lax.bitcast_convert_type(h_B, jnp.int32)


def contrastive_loss(zimg: jax.Array, ztxt: jax.Array, scale, bias=None, *, kind: str, impl: str,
                     mesh: Mesh | None = None, chunk_size: int | None = None,
                     text_key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Contrastive loss over the global batch and its metrics.

    Args:
      zimg, ztxt: L2-normalised [B, E] embeddings, sharded along B over the mesh's
        batch axes; row i of each is a positive pair.
      scale: the positive temperature multiplier (exp of the learnable log-scale).
      bias: the SigLIP bias (sigmoid only; None means 0).
      kind: "softmax" (CLIP InfoNCE) or "sigmoid" (SigLIP).
      impl: "dense", "allgather", "chunked" or "ring" (module docstring).
      mesh: the device mesh (required except for dense).
      chunk_size: column tile of chunked/ring; default: the largest divisor of the
        local batch whose fp32 [b, c] tile fits in TILE_BYTES.
      text_key: [B] int32, equal for identical captions (``text_keys``); the in-batch
        accuracy counts a best match with the query's key as right. None: every pair distinct.

    Returns:
      ``(loss, metrics)``: metrics hold loss, i2t_acc, t2i_acc (in-batch top-1),
      pos_sim, neg_sim (mean cosine similarity), scale and, with a bias, bias.
    """
    if kind not in KINDS:
        raise ValueError(f"contrastive_loss: unknown kind={kind!r}; choose one of {list(KINDS)}")
    if impl not in IMPLS:
        raise ValueError(f"contrastive_loss: unknown impl={impl!r}; choose one of {list(IMPLS)}")
    if zimg.ndim != 2 or zimg.shape != ztxt.shape:
        raise ValueError(f"contrastive_loss: zimg {zimg.shape} and ztxt {ztxt.shape} must both be [B, E]")
    if kind == "softmax" and bias is not None:
        bias = None  # a bias cancels in the softmax
    scale = jnp.asarray(scale, jnp.float32)
    bias_in = jnp.zeros((), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    batch = zimg.shape[0]
    keys = jnp.arange(batch, dtype=jnp.int32) if text_key is None else jnp.asarray(text_key, jnp.int32)

    if impl == "dense":
        loss, metrics = _dense(kind, zimg, ztxt, keys, scale, bias_in)
    else:
        if mesh is None:
            raise ValueError(f"contrastive_loss: impl={impl!r} needs the mesh")
        axes, n = sharding.batch_axes(mesh), sharding.batch_size_divisor(mesh)
        if batch % n:
            raise ValueError(f"contrastive_loss: global batch {batch} is not divisible by the {n} batch shards "
                             f"of mesh axes {axes}")
        b = batch // n
        if impl == "allgather":
            body = functools.partial(_allgather_body, kind, axes, batch)
            loss, metrics = jax.shard_map(body, mesh=mesh, in_specs=(P(axes, None), P(axes, None), P(axes), P(), P()),
                                          out_specs=(P(), P()))(zimg, ztxt, keys, scale, bias_in)
        else:
            block = b if impl == "ring" else batch
            c = chunk_size or default_chunk_size(b, block)
            if block % c:
                raise ValueError(f"contrastive_loss: chunk_size={c} must divide the {impl} column block {block} "
                                 f"(global batch {batch} over {n} shards)")
            loss, metrics = _streaming(kind, impl, mesh, axes, batch, c)(zimg, ztxt, keys, scale, bias_in)
    metrics = dict(metrics, loss=loss, scale=jax.lax.stop_gradient(scale))
    if bias is not None:
        metrics["bias"] = jax.lax.stop_gradient(bias_in)
    return loss, metrics
