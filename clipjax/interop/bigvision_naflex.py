"""big_vision ``naflex_vit`` image towers in ``.npz`` checkpoints: the two tensors whose layout differs.

big_vision's SigLIP 2 NaFlex checkpoints are ``two_towers`` with a ``naflex_vit`` image tower. Its
names are ``vit``'s, but the patch embedding is a Dense over flattened ``(py, px, c)`` patches,
``img/embedding/kernel`` ``[p*p*3, D]`` (``vit``: HWIO ``[p, p, 3, D]``), and the position table is
the grid itself, ``img/pos_embedding`` ``[G, G, D]`` (``vit``: ``[1, G*G, D]``). Both are reshapes
of ``vit``'s tensors, so ``clipjax.interop.bigvision`` reads and writes them through these two
functions and the rest of its mapping; a NaFlex model imports with ``model.image.seq_len`` set to
the grid's cell count (override it to run at another budget).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from clipjax.interop.blocks import WeightsError

KERNEL, POS = "img/embedding/kernel", "img/pos_embedding"


def is_naflex(flat: Mapping[str, np.ndarray]) -> bool:
    """Whether a (prefix-free) big_vision checkpoint's image tower is ``naflex_vit``'s."""
    return KERNEL in flat and flat[KERNEL].ndim == 2


def to_vit(flat: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """``(flat in vit's layout, the NaFlex sequence length to import with)`` of a NaFlex checkpoint."""
    kernel, pos = flat[KERNEL], flat[POS]
    p = math.isqrt(kernel.shape[0] // 3)
    if p * p * 3 != kernel.shape[0] or pos.ndim != 3 or pos.shape[0] != pos.shape[1]:
        raise WeightsError(f"not a big_vision naflex_vit image tower: {KERNEL} {kernel.shape} should be "
                           f"[p*p*3, D] and {POS} {pos.shape} a square [G, G, D] grid")
    out = dict(flat)
    out[KERNEL] = kernel.reshape(p, p, 3, -1)
    out[POS] = pos.reshape(1, -1, pos.shape[-1])
    return out, int(pos.shape[0] * pos.shape[1])


def from_vit(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A checkpoint in ``vit``'s layout written in ``naflex_vit``'s."""
    out = dict(flat)
    kernel, pos = flat[KERNEL], flat[POS]
    side = math.isqrt(pos.shape[1])
    out[KERNEL] = kernel.reshape(-1, kernel.shape[-1])
    out[POS] = pos.reshape(side, side, pos.shape[-1])
    return out
