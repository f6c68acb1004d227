"""Image<->text retrieval: Recall@K, mean/median rank and embedding diagnostics.

Several captions may belong to one image. ``owner_M[j]`` is the index of the
image caption ``j`` describes. Captions with the same text (``text_id_M``: equal ids
for identical token sequences; by default every caption is distinct) are one answer:
a caption is right for image ``i`` when its text is the text of one of ``i``'s
captions. Template captions ("a photo of a dog." for every dog) thus make every
image of the class a right answer for that caption and that caption right for each
of them, instead of ranking identical texts against one another.

Rank rule (ties with a wrong answer count against the query, "pessimistic"):

* text->image: caption ``j`` is right at ``k`` if any of its right images ranks
  within ``k``; with ``pos = max_{i right for j} s(i, j)``,
  ``rank = 1 + #{images i not right for j : s(i, j) >= pos}``.
* image->text: image ``i`` is right at ``k`` if any of its right captions ranks
  within ``k``; with ``best = max_{j right for i} s(i, j)``,
  ``rank = 1 + #{captions j not right for i : s(i, j) >= best}``.

So a wrong candidate that ties with the right one is ranked ahead of it, and a
collapsed model (all similarities equal) gets the worst rank rather than rank 1.
Recall@K is the fraction of queries with ``rank <= K``. Images without captions
are not image queries (they stay text->image candidates).

The similarity matrix is never materialised: image queries are sharded over
the batch axes and captions stream through in tiles (each tile all-gathered
from the devices' caption shards); each device keeps per-query running state
only (best positive score, count of scores at or above it). Two passes: the
first finds every image's best positive and does text->image, the second
counts image->text competitors. "Right" is a membership test of a caption's text
id in the image's ``[K]`` text ids (K: most captions of one image).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clipjax import sharding

DEFAULT_KS = (1, 5, 10)
TILE_BYTES = 8 * 2**20  # target size of one device's similarity tile (float32)
_HI = jax.lax.Precision.HIGHEST


def _single_device_mesh() -> Mesh:
    return sharding.make_mesh({a: 1 for a in sharding.MESH_AXES}, devices=jax.devices()[:1])


def _tile_cols(n_local: int, num_captions: int, shards: int, chunk_size: int) -> int:
    """Caption columns each device contributes per tile (``shards`` times that are scored per step)."""
    per_shard = -(-num_captions // shards)
    if chunk_size > 0:
        cols = -(-chunk_size // shards)
    else:
        cols = max(8, TILE_BYTES // (4 * max(n_local, 1) * shards))
    cols = max(1, min(cols, per_shard))
    steps = -(-per_shard // cols)
    return -(-per_shard // steps)  # same number of steps, least padding


def _rank_kernel(zimg, img_ok, img_tids, ztxt, tid, txt_ok, *, cols: int, axes: tuple[str, ...]):
    """Per-device body: local images ``[n, E]`` (text ids ``[n, K]``) against all captions, streamed in tiles."""
    m = ztxt.shape[0]
    steps = m // cols
    me = jax.lax.axis_index(axes)

    def tile(k):
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, k * cols, cols, 0)
        gather = lambda x: jax.lax.all_gather(sl(x), axes, tiled=True)
        t, i, v = gather(ztxt), gather(tid), gather(txt_ok)  # [D*cols, E], [D*cols], [D*cols]
        s = jnp.einsum("ne,ce->nc", zimg, t, precision=_HI, preferred_element_type=jnp.float32)
        right = jnp.any(i[None, :, None] == img_tids[:, None, :], axis=2)  # [n, D*cols]: caption's text is the image's
        return s, right, v

    def mine(x):  # this device's columns of a replicated per-tile vector
        return jax.lax.dynamic_slice_in_dim(x, me * cols, cols, 0)

    def pass1(best, k):
        s, right, v = tile(k)
        best = jnp.maximum(best, jnp.max(jnp.where(right & v[None, :], s, -jnp.inf), axis=1))
        # text->image: the best right image's score over every device's images, then the wrong ones at or above it.
        pos = jax.lax.pmax(jnp.max(jnp.where(right & img_ok[:, None], s, -jnp.inf), axis=0), axes)
        beat = (~right) & img_ok[:, None] & (s >= pos[None, :])
        cnt = jax.lax.psum(jnp.sum(beat, axis=0, dtype=jnp.int32), axes)
        return best, (mine(cnt), mine(pos))

    varying = lambda x: jax.lax.pcast(x, axes, to="varying")
    best, (t2i_cnt, pos) = jax.lax.scan(pass1, varying(jnp.full((zimg.shape[0],), -jnp.inf, jnp.float32)),
                                        jnp.arange(steps))

    def pass2(cnt, k):
        s, right, v = tile(k)
        beat = (~right) & v[None, :] & (s >= best[:, None])
        return cnt + jnp.sum(beat, axis=1, dtype=jnp.int32), None

    i2t_cnt, _ = jax.lax.scan(pass2, varying(jnp.zeros((zimg.shape[0],), jnp.int32)), jnp.arange(steps))
    return 1 + i2t_cnt, best, 1 + t2i_cnt.reshape(m), pos.reshape(m)


@functools.lru_cache(maxsize=32)
def _compiled_ranker(mesh: Mesh, cols: int):
    axes = sharding.BATCH_AXES
    spec = P(axes)
    fn = jax.shard_map(functools.partial(_rank_kernel, cols=cols, axes=axes), mesh=mesh,
                       in_specs=(P(axes, None), spec, P(axes, None), P(axes, None), spec, spec),
                       out_specs=(spec, spec, spec, spec))
    row = NamedSharding(mesh, spec)
    mat = NamedSharding(mesh, P(axes, None))
    return jax.jit(fn, in_shardings=(mat, row, mat, mat, row, row), out_shardings=(row, row, row, row))


def _layout(num_images: int, num_captions: int, mesh: Mesh, chunk_size: int) -> tuple[int, int, int]:
    """Padded image count, padded caption count and tile columns per device."""
    shards = sharding.batch_size_divisor(mesh)
    n_pad = -(-max(num_images, 1) // shards) * shards
    cols = _tile_cols(n_pad // shards, max(num_captions, 1), shards, chunk_size)
    m_pad = -(-max(num_captions, 1) // (shards * cols)) * (shards * cols)
    return n_pad, m_pad, cols


def _put(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array (the same on every process) as a global array sharded over the batch axes."""
    sh = sharding.batch_sharding(mesh, x.ndim)
    return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])


def retrieval_ranks(zimg_NE, ztxt_ME, owner_M, img_valid_N=None, txt_valid_M=None, *, text_id_M=None,
                    mesh: Mesh | None = None, chunk_size: int = 0) -> dict[str, np.ndarray]:
    """Ranks of every query (see the module docstring), computed sharded over ``mesh``.

    Returns numpy ``i2t_rank [N]``, ``t2i_rank [M]``, ``i2t_best [N]`` (best positive
    similarity, -inf for images without a valid caption) and ``pos_sim [M]``
    (similarity of each caption with its best right image). Invalid images are neither
    queries nor candidates; invalid captions likewise. ``text_id_M``: equal for
    captions with the same text (default: all distinct).
    """
    mesh = mesh or _single_device_mesh()
    zimg = np.asarray(zimg_NE, np.float32)
    ztxt = np.asarray(ztxt_ME, np.float32)
    owner = np.asarray(owner_M, np.int32)
    n, m = zimg.shape[0], ztxt.shape[0]
    img_ok = np.ones(n, bool) if img_valid_N is None else np.asarray(img_valid_N, bool)
    txt_ok = np.ones(m, bool) if txt_valid_M is None else np.asarray(txt_valid_M, bool)
    if owner.shape != (m,) or owner.size and (owner.min() < 0 or owner.max() >= n):
        raise ValueError(f"owner_M must be [M={m}] image indices in [0, {n})")
    txt_ok = txt_ok & img_ok[owner] if m else txt_ok  # a caption of an invalid image has no right answer
    tid = np.arange(m) if text_id_M is None else np.unique(np.asarray(text_id_M), return_inverse=True)[1].reshape(m)
    img_tids = image_text_ids(owner[txt_ok], tid[txt_ok].astype(np.int32), n)
    n_pad, m_pad, cols = _layout(n, m, mesh, chunk_size)
    e = zimg.shape[1]
    pad = lambda x, size, value: np.concatenate([x, np.full((size - x.shape[0], *x.shape[1:]), value, x.dtype)])
    args = (pad(zimg, n_pad, 0), pad(img_ok, n_pad, False), pad(img_tids, n_pad, -2), pad(ztxt.reshape(m, e), m_pad, 0),
            pad(tid.astype(np.int32), m_pad, -1), pad(txt_ok, m_pad, False))
    f = _compiled_ranker(mesh, cols)
    with jax.set_mesh(mesh):
        out = f(*(_put(a, mesh) for a in args))
    i2t, best, t2i, pos = (_host(x) for x in out)
    return {"i2t_rank": i2t[:n], "i2t_best": best[:n], "t2i_rank": t2i[:m], "pos_sim": pos[:m]}


def image_text_ids(owner_M: np.ndarray, tid_M: np.ndarray, n: int) -> np.ndarray:
    """``[n, K]`` text ids of each image's captions (K: the most any image has), padded with -2."""
    order = np.argsort(owner_M, kind="stable")
    owner, tid = owner_M[order], tid_M[order]
    counts = np.bincount(owner, minlength=n)
    slot = np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)  # index within the image's captions
    out = np.full((n, max(1, int(counts.max(initial=0)))), -2, np.int32)
    out[owner, slot] = tid
    return out


def _host(x: jax.Array) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _recall_chance_i2t(caps_per_image: np.ndarray, num_captions: int, k: int) -> float:
    """Expected image->text Recall@k of a random ranking (any of c captions in the top k of M)."""
    if caps_per_image.size == 0 or num_captions == 0:
        return float("nan")
    miss = np.ones(caps_per_image.shape, np.float64)
    for t in range(min(k, num_captions)):
        miss *= np.clip((num_captions - caps_per_image - t) / (num_captions - t), 0.0, 1.0)
    return float(np.mean(1.0 - miss))


def rank_summary(ranks: np.ndarray, valid: np.ndarray, ks: Sequence[int], prefix: str) -> dict[str, float]:
    """Recall@k (fraction with rank <= k), mean and median rank over the valid queries."""
    r = np.asarray(ranks)[np.asarray(valid, bool)].astype(np.float64)
    out = {f"{prefix}_r{k}": float(np.mean(r <= k)) if r.size else float("nan") for k in ks}
    out[f"{prefix}_mean_rank"] = float(np.mean(r)) if r.size else float("nan")
    out[f"{prefix}_median_rank"] = float(np.median(r)) if r.size else float("nan")
    return out


def retrieval_metrics(zimg_NE, ztxt_ME, owner_M, *, text_id_M=None, mesh: Mesh | None = None, chunk_size: int = 0,
                      ks: Sequence[int] = DEFAULT_KS) -> tuple[dict[str, float], dict[str, float]]:
    """Retrieval metrics and their chance levels for valid (already compacted) embeddings;
    ``text_id_M`` as for ``retrieval_ranks`` (chance levels treat every caption as distinct).

    Metrics: ``i2t_r{k}``, ``t2i_r{k}``, ``{i2t,t2i}_{mean,median}_rank``,
    ``modality_gap`` (L2 distance between the image and caption centroids),
    ``pos_sim`` (mean similarity of matching pairs), ``neg_sim`` (mean over all
    non-matching image-caption pairs), ``num_images``, ``num_captions``.
    """
    zimg = np.asarray(zimg_NE, np.float32)
    ztxt = np.asarray(ztxt_ME, np.float32)
    owner = np.asarray(owner_M, np.int64)
    n, m = zimg.shape[0], ztxt.shape[0]
    r = retrieval_ranks(zimg, ztxt, owner, text_id_M=text_id_M, mesh=mesh, chunk_size=chunk_size)
    caps = np.bincount(owner, minlength=n) if m else np.zeros(n, np.int64)
    out = rank_summary(r["i2t_rank"], caps > 0, ks, "i2t")
    out.update(rank_summary(r["t2i_rank"], np.ones(m, bool), ks, "t2i"))
    out.update(embedding_diagnostics(zimg, ztxt, owner))
    out.update(num_images=float(n), num_captions=float(m))
    chance = {f"i2t_r{k}": _recall_chance_i2t(caps[caps > 0], m, k) for k in ks}
    chance.update({f"t2i_r{k}": min(k, n) / n if n else float("nan") for k in ks})
    return out, chance


def embedding_diagnostics(zimg_NE, ztxt_ME, owner_M) -> dict[str, float]:
    """Modality gap and mean positive / negative similarity (float64 on the host).

    The negative mean covers every (image, caption) pair whose caption is not the
    image's; it is computed from the embedding sums, never from the full matrix.
    """
    zi = np.asarray(zimg_NE, np.float64)
    zt = np.asarray(ztxt_ME, np.float64)
    owner = np.asarray(owner_M, np.int64)
    n, m = zi.shape[0], zt.shape[0]
    if n == 0 or m == 0:
        return {"modality_gap": float("nan"), "pos_sim": float("nan"), "neg_sim": float("nan")}
    gap = float(np.linalg.norm(zi.mean(0) - zt.mean(0)))
    pos = np.einsum("me,me->m", zi[owner], zt)
    total = float(zi.sum(0) @ zt.sum(0))
    num_neg = n * m - m
    neg = (total - float(pos.sum())) / num_neg if num_neg else float("nan")
    return {"modality_gap": gap, "pos_sim": float(pos.mean()), "neg_sim": neg}
