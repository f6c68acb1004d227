"""Zero-shot classification: prompt-ensembled class embeddings, top-k accuracy.

A class's embedding is the re-normalised mean over templates of the normalised
text embeddings of ``template.format(classname)`` (prompt ensembling). An image
is classified by cosine similarity with every class embedding.

Tie rule (the same as retrieval): the true class's rank is
``1 + #{other classes c : s(image, c) >= s(image, true class)}``; the image is
right at k when ``rank <= min(k, num_classes)``. Ties count against the image.
Only examples with ``mask`` set and a label in ``[0, num_classes)`` count.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clipjax.models import l2_normalise

DEFAULT_KS = (1, 5)
_HI = jax.lax.Precision.HIGHEST


def ensemble_prompts(ztxt_CTE: jax.Array) -> jax.Array:
    """``[C, T, E]`` text embeddings (class x template) -> ``[C, E]`` normalised class embeddings."""
    return l2_normalise(jnp.mean(l2_normalise(ztxt_CTE.astype(jnp.float32)), axis=1))


def zeroshot_ranks(zimg_NE: jax.Array, zcls_CE: jax.Array, labels_N: jax.Array) -> jax.Array:
    """Rank of each image's true class among all classes (ties pessimistic; see module doc).

    Labels outside ``[0, C)`` give meaningless ranks; mask them out.
    """
    logits = jnp.einsum("ne,ce->nc", zimg_NE.astype(jnp.float32), zcls_CE.astype(jnp.float32), precision=_HI)
    c = logits.shape[1]
    labels = jnp.clip(labels_N.astype(jnp.int32), 0, c - 1)
    true = jnp.take_along_axis(logits, labels[:, None], axis=1)
    other = jnp.arange(c, dtype=jnp.int32)[None, :] != labels[:, None]
    return 1 + jnp.sum(other & (logits >= true), axis=1, dtype=jnp.int32)


def valid_labels(labels_N: jax.Array, num_classes: int, mask_N: jax.Array | None = None) -> jax.Array:
    ok = (labels_N >= 0) & (labels_N < num_classes)
    return ok if mask_N is None else ok & mask_N.astype(bool)


def accuracy_from_ranks(ranks_N: np.ndarray, ok_N: np.ndarray, num_classes: int,
                        ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Host-side top-k accuracy from gathered ranks (NaN when nothing is valid)."""
    r = np.asarray(ranks_N)[np.asarray(ok_N, bool)]
    return {f"top{k}": float(np.mean(r <= min(k, num_classes))) if r.size else float("nan") for k in ks}


def chance(num_classes: int, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Top-k accuracy of a random guess."""
    return {f"top{k}": min(k, num_classes) / num_classes for k in ks}


def prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """All ``C * T`` prompts, class-major (``[c0 t0, c0 t1, ..., c1 t0, ...]``)."""
    return [t.format(c) for c in classnames for t in templates]


def class_embeddings(encode_text: Callable[[np.ndarray], np.ndarray], tokenize: Callable[[list[str]], np.ndarray],
                     classnames: Sequence[str], templates: Sequence[str], *, batch_size: int) -> np.ndarray:
    """Tokenizes every prompt, embeds them ``batch_size`` at a time, ensembles per class.

    ``encode_text(ids [batch_size, L]) -> [batch_size, E]`` (host numpy out); the last
    batch is padded by repeating a row, so one compiled shape serves every call.
    """
    texts = prompts(classnames, templates)
    ids = np.asarray(tokenize(texts), np.int32)
    num = ids.shape[0]
    pad = (-num) % batch_size
    if pad:
        ids = np.concatenate([ids, np.repeat(ids[-1:], pad, axis=0)])
    out = [np.asarray(encode_text(ids[i:i + batch_size]), np.float32) for i in range(0, ids.shape[0], batch_size)]
    z = np.concatenate(out)[:num].reshape(len(classnames), len(templates), -1)
    return np.asarray(jax.jit(ensemble_prompts)(z))
