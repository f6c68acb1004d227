"""Model FLOPs utilisation: peak FLOP/s per device, analytic model FLOPs, and their ratio.

* ``peak_flops_per_device(device, dtype)``: dense vendor peak of the accelerator for the dtype from
  ``PEAK_FLOPS``; on CPU a measured fp32 matmul rate shared among the simulated
  devices; ``CLIPJAX_PEAK_FLOPS`` (FLOP/s per device) overrides both.
* ``mfu(flops, step_time, peak)``: the ratio.
* ``clip_train_flops(model_cfg, batch)``: the analytic model-FLOP count behind
  ``train/mfu`` (no recomputation); ``hlo_flops.compiled_flops`` is behind ``train/hfu``.

Per-step FLOPs measured from the compiled executable live in ``hlo_flops``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp

from clipjax.models.masking import num_kept

log = logging.getLogger("clipjax")

# Dense (no sparsity) bf16 peak FLOP/s per chip, keyed by a substring of
# ``jax.Device.device_kind`` (matched case-insensitively, longest key first, so
# "TPU v5 lite" wins over "TPU v5" and "H100 PCIe" over "H100").
# Source for every row: the vendor spec sheet (Google Cloud TPU system
# architecture pages; NVIDIA data sheets, dense Tensor Core BF16 figures).
PEAK_FLOPS: dict[str, float] = {
    "TPU v2": 45e12,
    "TPU v3": 123e12,
    "TPU v4": 275e12,
    "TPU v4 lite": 138e12,  # v4i
    "TPU v5 lite": 197e12,  # v5e reports itself as "TPU v5 lite"
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p reports itself as "TPU v5"
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # Trillium (v6e) reports itself as "TPU v6 lite"
    "TPU v6e": 918e12,
    "TPU v6": 918e12,
    "TPU7x": 2307e12,  # Ironwood
    "TPU v7": 2307e12,
    "A100": 312e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L4": 121e12,
    "L40S": 362e12,
    "H100": 989e12,  # SXM; device_kind e.g. "NVIDIA H100 80GB HBM3"
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H800": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "B100": 1750e12,
    "B200": 2250e12,
    "GB200": 2500e12,
}

# Dense float32 matmul peak of NVIDIA GPUs, where XLA runs float32 dots on TF32 tensor cores
# by default (data sheets, dense TF32 figures). TPUs run float32 dots at default precision as
# one bfloat16 pass, so their bf16 row stands for float32 too.
PEAK_FLOPS_TF32: dict[str, float] = {
    "A100": 156e12,
    "A10G": 35e12,
    "A10": 62.5e12,
    "L4": 60e12,
    "L40S": 183e12,
    "H100": 495e12,
    "H100 PCIe": 378e12,
    "H100 NVL": 418e12,
    "H800": 495e12,
    "H200": 495e12,
    "GH200": 495e12,
    "B100": 875e12,
    "B200": 1125e12,
    "GB200": 1250e12,
}

PEAK_ENV = "CLIPJAX_PEAK_FLOPS"

_PEAK_CACHE: dict[tuple, tuple[float, str]] = {}


# jax's ``device_kind`` of these TPUs is not their product name (see PEAK_FLOPS).
PRODUCT_NAMES: dict[str, str] = {"TPU v5 lite": "TPU v5e", "TPU v5": "TPU v5p", "TPU v6 lite": "TPU v6e"}


def device_name(kind: str) -> str:
    """The product name of a jax ``device_kind``: "TPU v5" is a v5p, "TPU v5 lite" a v5e."""
    return PRODUCT_NAMES.get(kind, kind)


def lookup_peak(kind: str, dtype: str = "bfloat16") -> tuple[float, str] | None:
    """``(flops, key)`` for the longest table key found in ``kind``, or None.

    ``dtype`` is the matmul compute dtype: float32 on a GPU reads ``PEAK_FLOPS_TF32``;
    everything else (bf16, fp16, float32 on TPU) reads ``PEAK_FLOPS``.
    """
    table = PEAK_FLOPS
    if str(dtype) == "float32" and "tpu" not in kind.lower():
        table = PEAK_FLOPS_TF32
    low = kind.lower()
    for key in sorted(table, key=len, reverse=True):
        if key.lower() in low:
            return table[key], key
    return None


def peak_for_kind(kind: str) -> float:
    """Peak FLOP/s per device for a device kind such as ``"TPU v5p"``; ValueError if unknown."""
    hit = lookup_peak(kind)
    if hit is None:
        raise ValueError(f"no peak FLOP/s known for device kind {kind!r}; known: {sorted(PEAK_FLOPS)} "
                         f"(pass the peak explicitly or set {PEAK_ENV})")
    return hit[0]


def measure_cpu_matmul_flops(device=None, n: int = 1024, repeats: int = 5) -> float:
    """Best-of-``repeats`` FLOP/s of a jitted fp32 ``n x n @ n x n`` matmul on ``device``."""
    device = device or jax.local_devices(backend="cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    b = jax.device_put(jnp.full((n, n), 0.5, jnp.float32), device)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()  # compile and warm up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def peak_flops_per_device(device=None, dtype: str = "bfloat16") -> tuple[float, str]:
    """``(peak FLOP/s of one device for matmuls in dtype, how it was obtained)``; cached.

    Sources, in order: ``$CLIPJAX_PEAK_FLOPS`` ("env CLIPJAX_PEAK_FLOPS");
    CPU: the measured fp32 matmul rate of the host divided by the number of
    simulated CPU devices, which share its cores ("measured CPU matmul");
    otherwise the vendor row for ``dtype`` (``lookup_peak``; "table: <key>"). An
    accelerator missing from the table gives ``(nan, "unknown: <kind>")``, so MFU
    is logged as null.
    """
    env = os.environ.get(PEAK_ENV)
    if env:
        return float(env), f"env {PEAK_ENV}"
    device = device or jax.local_devices()[0]
    count = jax.local_device_count(backend="cpu") if device.platform == "cpu" else 1
    cpu = device.platform == "cpu"
    key = (device.platform, device.device_kind, count, None if cpu else str(dtype))
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    if cpu:
        out = (measure_cpu_matmul_flops(device) / count, "measured CPU matmul")
    else:
        hit = lookup_peak(device.device_kind, str(dtype))
        if hit is None:
            log.warning("no peak FLOP/s known for %r; MFU will be NaN (set %s)", device.device_kind, PEAK_ENV)
            out = (float("nan"), f"unknown: {device.device_kind}")
        else:
            out = (hit[0], f"table: {hit[1]}")
    _PEAK_CACHE[key] = out
    return out


def mfu(flops_per_device_per_step: float, step_time_s: float, peak_per_device: float) -> float:
    """Achieved FLOP/s per device over peak FLOP/s per device; NaN when undefined."""
    if not step_time_s or step_time_s <= 0 or not peak_per_device or not math.isfinite(peak_per_device):
        return float("nan")
    return flops_per_device_per_step / step_time_s / peak_per_device


# --- Analytic count ---------------------------------------------------------------------------


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def transformer_forward_flops(tokens: int, width: int, depth: int, mlp_dim: int, last_rows: int | None = None) -> float:
    """Forward matmul FLOPs of pre-norm blocks for one sequence of ``tokens`` tokens.

    Per layer and token: qkv + output projections ``2*4*d^2``, MLP ``2*2*d*mlp``,
    scores and weighted values ``2*2*T*d`` (dense: a causal mask saves nothing).
    ``last_rows``: the rows the last block computes when the tower pools one token
    (``Transformer(query_B=...)``): its keys and values still cover every token, its
    query, output projection, MLP and scores only those rows.
    """
    d, t = width, tokens

    def layer(rows: int) -> int:
        return rows * (2 * (2 * d * d + 2 * d * mlp_dim) + 4 * t * d) + t * 2 * 2 * d * d

    return float((depth - 1) * layer(t) + layer(t if last_rows is None else last_rows))


def map_head_flops(tokens: int, width: int, mlp_dim: int) -> float:
    """Forward matmul FLOPs of attention pooling: one probe query over ``tokens`` keys, then its MLP."""
    d, t = width, tokens
    return float(2 * d * d + 4 * t * d * d + 4 * t * d + 2 * d * d + 4 * d * mlp_dim)


def vit_flops(image_size: int, patch_size: int, width: int, depth: int, mlp_dim: int, embed_dim: int,
              class_token: bool = True, channels: int = 3, pool: str = "tok", mask_ratio: float = 0.0,
              seq_len: int = 0) -> float:
    """Forward matmul FLOPs of the image tower for one image (patchify, blocks, pooling, projection).

    With FLIP's ``mask_ratio`` every patch is embedded and the blocks see the kept ones. NaFlex
    (``seq_len`` > 0) runs on ``seq_len`` tokens, padding included (it is computed); the per-image
    position grid resize (``2 * seq_len * G*G * width``) is counted too.
    """
    patches = seq_len or (image_size // patch_size) ** 2
    tokens = num_kept(patches, mask_ratio) + int(class_token)
    embed = 2 * patches * patch_size * patch_size * channels * width
    head = map_head_flops(tokens, width, mlp_dim) if pool == "map" else 0.0
    last_rows = 1 if pool == "tok" else None  # the class token's row only
    resize = 2 * seq_len * (image_size // patch_size) ** 2 * width
    return embed + resize + transformer_forward_flops(tokens, width, depth, mlp_dim, last_rows) + head + 2 * width * embed_dim


def text_flops(context_length: int, width: int, depth: int, mlp_dim: int, embed_dim: int) -> float:
    """Forward matmul FLOPs of the text tower for one caption (the token embedding is a gather).

    The tower pools one token, so its last block computes that row only.
    """
    return transformer_forward_flops(context_length, width, depth, mlp_dim, last_rows=1) + 2 * width * embed_dim


def clip_train_flops(model_cfg: Any, batch: int) -> float:
    """Model FLOPs of one training step for the global ``batch`` (all devices together).

    ``3 * forward`` (backward is twice the forward) of every matmul in both towers:
    patch embedding, attention projections, attention scores and weighted values,
    MLPs, pooling head and output projections; plus the ``batch x batch``
    similarity matrix of the loss: ``2*B*B*E`` forward, ``6*B*B*E`` with its
    gradients. Elementwise work (norms, activations, softmax, the optimizer) is
    not counted; FLIP's masked patches are not counted; nor are the rows of the last
    block that pooling never reads (``transformer_forward_flops``'s ``last_rows``).
    ``model_cfg`` is a resolved ``config.model`` (or a dict with the same keys).
    Rematerialisation is not counted (model FLOPs, not hardware), so the figure does
    not depend on ``model.remat``. Divide by the device count for the per-device figure.
    """
    img, txt = _get(model_cfg, "image"), _get(model_cfg, "text")
    e = _get(model_cfg, "embed_dim")
    f_img = vit_flops(_get(img, "image_size", 224), _get(img, "patch_size"), _get(img, "width"),
                      _get(img, "depth"), _get(img, "mlp_dim"), e, bool(_get(img, "class_token", True)),
                      pool=_get(img, "pool", "tok"), mask_ratio=float(_get(img, "mask_ratio", 0.0)),
                      seq_len=int(_get(img, "seq_len", 0) or 0))
    f_txt = text_flops(_get(txt, "context_length", 77), _get(txt, "width"), _get(txt, "depth"),
                       _get(txt, "mlp_dim"), e)
    return 3.0 * batch * (f_img + f_txt) + 6.0 * batch * batch * e
