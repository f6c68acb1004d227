"""Exact cross-entropy over a large vocabulary without its logits: one vocabulary chunk at a time.

``[N, V]`` float32 logits for N = 32k examples x 64 tokens and V = 256k would be
2 PiB; the loss needs only each row's log-sum-exp and its target logit. The
forward pass sweeps the vocabulary in chunks of ``chunk`` columns keeping a running
max and sum (the online softmax); the backward pass sweeps again, recomputing each
chunk's logits to form ``softmax - onehot`` and its two matmuls. At most
``[N, chunk]`` logits exist at a time, so memory does not grow with V.

Dimension letters: N rows (batch x length), D width, V vocabulary, C chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _chunk(w_DV: jax.Array, k: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(start, w_DC, valid_C)``: chunk k's columns; the last chunk ends at V and its columns
    that chunk k-1 already covered are not valid (no padded copy of w is made)."""
    start = jnp.minimum(k * chunk, w_DV.shape[1] - chunk)
    return start, jax.lax.dynamic_slice_in_dim(w_DV, start, chunk, axis=1), start + jnp.arange(chunk) >= k * chunk


def _logits(h_ND: jax.Array, w_DC: jax.Array, valid_C: jax.Array) -> jax.Array:
    logits_NC = jnp.einsum("nd,dc->nc", h_ND, w_DC, preferred_element_type=jnp.float32)
    return jnp.where(valid_C[None], logits_NC, -jnp.inf)


def _logsumexp(h_ND: jax.Array, w_DV: jax.Array, chunk: int) -> jax.Array:
    def sweep(carry, k):
        m_N, s_N = carry
        _, w_DC, valid_C = _chunk(w_DV, k, chunk)
        logits_NC = _logits(h_ND, w_DC, valid_C)
        m_new = jnp.maximum(m_N, jnp.max(logits_NC, axis=-1))
        s_N = s_N * jnp.exp(m_N - m_new) + jnp.sum(jnp.exp(logits_NC - m_new[:, None]), axis=-1)
        return (m_new, s_N), None

    n = h_ND.shape[0]
    init = (jnp.full((n,), -jnp.inf), jnp.zeros((n,)))
    (m_N, s_N), _ = jax.lax.scan(sweep, init, jnp.arange(-(-w_DV.shape[1] // chunk)))
    return m_N + jnp.log(s_N)


def _target_logit(h_ND: jax.Array, w_DV: jax.Array, t_N: jax.Array) -> jax.Array:
    return jnp.einsum("nd,nd->n", h_ND, jnp.take(w_DV, t_N, axis=1).T, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def token_nll(h_ND: jax.Array, w_DV: jax.Array, t_N: jax.Array, chunk: int) -> jax.Array:
    """float32 ``-log softmax(h @ w)[n, t_n]`` per row, computed ``chunk`` vocabulary columns at a time."""
    chunk = min(chunk, w_DV.shape[1])
    return _logsumexp(h_ND, w_DV, chunk) - _target_logit(h_ND, w_DV, t_N)


def _fwd(h_ND, w_DV, t_N, chunk):
    lse_N = _logsumexp(h_ND, w_DV, min(chunk, w_DV.shape[1]))
    return lse_N - _target_logit(h_ND, w_DV, t_N), (h_ND, w_DV, t_N, lse_N)


def _bwd(chunk, res, g_N):
    h_ND, w_DV, t_N, lse_N = res
    chunk = min(chunk, w_DV.shape[1])
    h32_ND = h_ND.astype(jnp.float32)

    def sweep(carry, k):
        dh_ND, dw_DV = carry
        start, w_DC, valid_C = _chunk(w_DV, k, chunk)
        # d(logsumexp)/d(logits) = softmax, recomputed from this chunk's logits and the saved lse;
        # columns another chunk owns have p = 0, so adding over them changes nothing.
        p_NC = jnp.exp(_logits(h_ND, w_DC, valid_C) - lse_N[:, None]) * g_N[:, None]
        dh_ND = dh_ND + jnp.einsum("nc,dc->nd", p_NC, w_DC.astype(jnp.float32))
        dw_DC = jax.lax.dynamic_slice_in_dim(dw_DV, start, chunk, axis=1) + jnp.einsum("nd,nc->dc", h32_ND, p_NC)
        return (dh_ND, jax.lax.dynamic_update_slice_in_dim(dw_DV, dw_DC, start, axis=1)), None

    init = (jnp.zeros(h_ND.shape, jnp.float32), jnp.zeros(w_DV.shape, jnp.float32))
    (dh_ND, dw_DV), _ = jax.lax.scan(sweep, init, jnp.arange(-(-w_DV.shape[1] // chunk)))
    # The target logit's part: -g at the target column.
    dh_ND = dh_ND - g_N[:, None] * jnp.take(w_DV, t_N, axis=1).T.astype(jnp.float32)
    dw_DV = dw_DV.at[:, t_N].add(-(h32_ND * g_N[:, None]).T)
    return dh_ND.astype(h_ND.dtype), dw_DV.astype(w_DV.dtype), None


token_nll.defvjp(_fwd, _bwd)


def sequence_nll(h_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array, chunk: int) -> jax.Array:
    """float32 ``[B, T]`` NLL of each target token under ``softmax(h @ w)``, never holding ``[B, T, V]``."""
    b, t, d = h_BTD.shape
    return token_nll(h_BTD.reshape(b * t, d), w_DV, targets_BT.reshape(-1).astype(jnp.int32), chunk).reshape(b, t)


def dense_sequence_nll(h_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """The same from the whole ``[B, T, V]`` logits at once (what the chunks avoid; the benchmark's baseline)."""
    logits_BTV = jnp.einsum("btd,dv->btv", h_BTD, w_DV, preferred_element_type=jnp.float32)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits_BTV), targets_BT[..., None], axis=-1)[..., 0]
