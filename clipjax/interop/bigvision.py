"""big_vision SigLIP / SigLIP 2 ``.npz`` checkpoints (``two_towers`` with ``vit`` towers) in and out.

``import_weights(path) -> (config.model, params)`` reads per-layer (``encoderblock_N``) and scanned
(``encoderblock`` stacked along a leading layer axis) layouts, with or without the ``params/``
prefix; ``export_weights(params, model_config, path, scanned=False, prefix=True)`` writes either.
The ``.npz`` is read with ``allow_pickle=False``. big_vision's kernels already have clipjax's
layouts (attention ``[D, N, H]`` / ``[N, H, D]``, Dense ``[in, out]``), so the mapping renames and
reshapes only: round trips are bit-exact. Key table: docs/interop.md.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from typing import Any, Mapping

import ml_collections
import numpy as np

from clipjax.interop import bigvision_naflex, blocks
from clipjax.interop.blocks import WeightsError

# clipjax block param -> big_vision encoderblock param.
_ATTN = {f"{n}_{p}": f"{n}/{p}" for n in ("query", "key", "value", "out") for p in ("kernel", "bias")}
_BLOCK = {**{f"attn/{k}": f"MultiHeadDotProductAttention_0/{v}" for k, v in _ATTN.items()},
          "ln_attn/scale": "LayerNorm_0/scale", "ln_attn/bias": "LayerNorm_0/bias",
          "ln_mlp/scale": "LayerNorm_1/scale", "ln_mlp/bias": "LayerNorm_1/bias",
          "mlp/fc_kernel": "MlpBlock_0/Dense_0/kernel", "mlp/fc_bias": "MlpBlock_0/Dense_0/bias",
          "mlp/proj_kernel": "MlpBlock_0/Dense_1/kernel", "mlp/proj_bias": "MlpBlock_0/Dense_1/bias"}
# The MAP head: a probe and the block's attention, LayerNorm and MLP names.
_MAP = {"probe": "probe", **{k: v for k, v in _BLOCK.items() if not k.startswith("ln_mlp")}}
_MAP = {k.replace("ln_attn/", "ln/"): v for k, v in _MAP.items()}
# (clipjax key, big_vision key, how): "=" as is, "pos" [N, D] <-> [1, N, D], "patch" [(p p C), D] <->
# HWIO [p, p, C, D], "1" [] <-> [1].
TABLE = (
    ("image/patch_kernel", "img/embedding/kernel", "patch"),
    ("image/patch_bias", "img/embedding/bias", "="),
    ("image/pos_embedding", "img/pos_embedding", "pos"),
    ("image/ln_post/scale", "img/Transformer/encoder_norm/scale", "="),
    ("image/ln_post/bias", "img/Transformer/encoder_norm/bias", "="),
    *((f"image/map_head/{k}", f"img/MAPHead_0/{v}", "=") for k, v in _MAP.items()),
    ("text/token_embedding", "txt/Embed_0/embedding", "="),
    ("text/pos_embedding", "txt/pos_embedding", "pos"),
    ("text/ln_final/scale", "txt/Encoder_0/encoder_norm/scale", "="),
    ("text/ln_final/bias", "txt/Encoder_0/encoder_norm/bias", "="),
    ("text/proj", "txt/head/kernel", "="),
    ("text/proj_bias", "txt/head/bias", "="),
    ("logit_scale", "t", "1"),
    ("logit_bias", "b", "1"),
)
ENCODERS = {"image": "img/Transformer/", "text": "txt/Encoder_0/"}


def read_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of a big_vision ``.npz`` (no ``params/`` prefix), never unpickling anything."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"big_vision checkpoint {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            flat = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise WeightsError(f"{path}: not a readable .npz of arrays (truncated, pickled objects, or another "
                           f"format?): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return {k.removeprefix("params/"): v for k, v in flat.items()}


def _layout(flat: Mapping[str, np.ndarray], encoder: str) -> tuple[int, bool]:
    """(depth, scanned) of one tower's encoder."""
    if any(k.startswith(encoder + "encoderblock/") for k in flat):
        return int(flat[encoder + "encoderblock/LayerNorm_0/scale"].shape[0]), True
    found = {int(m.group(1)) for k in flat if (m := re.match(re.escape(encoder) + r"encoderblock_(\d+)/", k))}
    if not found:
        raise WeightsError(f"no {encoder}encoderblock_N or {encoder}encoderblock (scanned) entries: "
                           "not a big_vision two_towers checkpoint with ViT towers")
    return len(found), False


def model_config_from_npz(flat: Mapping[str, np.ndarray], *, scan: bool = True) -> ml_collections.ConfigDict:
    """clipjax's ``config.model`` of a big_vision SigLIP checkpoint: shapes give every size and head count;
    the architecture is SigLIP's (GELU tanh, LayerNorm eps 1e-6, MAP head, last-position text pooling)."""
    from clipjax.config import base_config
    from clipjax.interop.openclip import _matching_row

    needed = [ours for ours, theirs, _ in TABLE if theirs not in flat]
    if needed:
        raise WeightsError(f"not a big_vision SigLIP checkpoint: missing {[t for o, t, _ in TABLE if o in needed][:6]} "
                           f"(it has {len(flat)} entries such as {sorted(flat)[:4]}); clipjax reads ViT towers "
                           "with a MAP head and a text head")
    m = base_config().model
    kernel = flat["img/embedding/kernel"]  # HWIO [p, p, 3, D]
    patch, width = int(kernel.shape[0]), int(kernel.shape[-1])
    grid = math.isqrt(flat["img/pos_embedding"].shape[-2])
    towers = {}
    for tower, encoder in ENCODERS.items():
        depth, scanned = _layout(flat, encoder)
        first = blocks.unstack(blocks.sub(flat, encoder), 1, scanned, stacked="encoderblock", layer="encoderblock_{}")[0]
        q = first["MultiHeadDotProductAttention_0/query/kernel"]  # [D, N, H]
        towers[tower] = dict(depth=depth, heads=int(q.shape[1]), width=int(q.shape[0]),
                             mlp_dim=int(first["MlpBlock_0/Dense_0/kernel"].shape[1]))
    vocab, _ = flat["txt/Embed_0/embedding"].shape
    m.embed_dim = width
    m.image.update(**towers["image"], patch_size=patch, image_size=grid * patch, pool="map", class_token=False,
                   ln_pre=False, patch_bias=True, proj=False, norm="siglip")
    m.text.update(**towers["text"], vocab_size=int(vocab), context_length=int(flat["txt/pos_embedding"].shape[-2]),
                  pool="final", causal=False, pad_mask=False, proj_bias=True)
    m.act, m.ln_eps, m.dtype, m.scan = "gelu_tanh", 1e-6, "float32", bool(scan)
    m.init_logit_scale, m.init_logit_bias = math.log(10.0), -10.0
    m.size = _matching_row(m) or "tiny"
    return m


def _check_siglip(m: ml_collections.ConfigDict) -> None:
    from clipjax.interop import hf

    if m.init_logit_bias is None:
        raise WeightsError("big_vision's two_towers SigLIP has a logit bias (b); this model has none "
                           "(export a CLIP model with clipjax.interop.hf or openclip)")
    hf.hf_config(m)  # the same tower options as transformers' SiglipModel (names what does not fit)
    if m.act != "gelu_tanh" or abs(m.ln_eps - 1e-6) > 1e-12:
        raise WeightsError(f"big_vision's ViT uses GELU tanh and LayerNorm eps 1e-6; this model has "
                           f"model.act={m.act!r}, model.ln_eps={m.ln_eps}")


def expected_shapes(m: ml_collections.ConfigDict, *, scanned: bool = False) -> dict[str, tuple[int, ...]]:
    """Every big_vision key (no ``params/`` prefix) of model ``m`` with its shape."""
    import jax
    from flax import linen as nn

    from clipjax.models import build_model, dummy_inputs

    shapes = jax.eval_shape(lambda: build_model(m).init(jax.random.key(0), *dummy_inputs(m)))["params"]
    zeros = jax.tree.map(lambda a: np.broadcast_to(np.float32(0), a.shape), nn.unbox(shapes))
    return {k: tuple(v.shape) for k, v in state_dict_from_params(zeros, m, scanned=scanned, check=False).items()}


def params_from_npz(flat: Mapping[str, np.ndarray], m: ml_collections.ConfigDict) -> dict[str, Any]:
    """clipjax params of model ``m`` from a (prefix-free) big_vision checkpoint."""
    from flax import traverse_util

    _check_siglip(m)
    scanned = {tower: _layout(flat, encoder)[1] for tower, encoder in ENCODERS.items()}
    img, txt = expected_shapes(m, scanned=scanned["image"]), expected_shapes(m, scanned=scanned["text"])
    want = {**{k: v for k, v in img.items() if not k.startswith("txt/")},
            **{k: v for k, v in txt.items() if k.startswith("txt/")}}
    blocks.check_keys(flat, want, "checkpoint does not match a big_vision SigLIP", WeightsError)
    out = {}
    for ours, theirs, how in TABLE:
        v = flat[theirs]
        out[ours] = {"patch": lambda a: a.reshape(-1, a.shape[-1]), "pos": lambda a: a.reshape(a.shape[-2:]),
                     "1": lambda a: a.reshape(()), "=": lambda a: a}[how](v)
    for tower, encoder in ENCODERS.items():
        theirs = blocks.unstack(blocks.sub(flat, encoder), m[tower].depth, scanned[tower], stacked="encoderblock",
                                layer="encoderblock_{}")
        ours = [{k: b[v] for k, v in _BLOCK.items()} for b in theirs]
        out.update(blocks.prefixed(f"{tower}/transformer/", blocks.stack(ours, m.scan)))
    out = {k: np.asarray(v, dtype=np.float32, order="C") for k, v in out.items()}
    return traverse_util.unflatten_dict(out, sep="/")


def state_dict_from_params(params: Any, m: ml_collections.ConfigDict, *, scanned: bool = False,
                           check: bool = True) -> dict[str, np.ndarray]:
    """The big_vision arrays (no ``params/`` prefix) of clipjax ``params``; blocks stacked when ``scanned``."""
    from flax import linen as nn
    from flax import traverse_util

    _check_siglip(m)
    flat = {k: np.asarray(v, dtype=np.float32) for k, v in traverse_util.flatten_dict(nn.unbox(params), sep="/").items()}
    p = m.image.patch_size
    out = {}
    for ours, theirs, how in TABLE:
        v = flat[ours]
        out[theirs] = {"patch": lambda a: a.reshape(p, p, 3, -1), "pos": lambda a: a[None],
                       "1": lambda a: a.reshape(1), "=": lambda a: a}[how](v)
    for tower, encoder in ENCODERS.items():
        ours = blocks.unstack(blocks.sub(flat, f"{tower}/transformer/"), m[tower].depth, m.scan)
        theirs = [{v: b[k] for k, v in _BLOCK.items()} for b in ours]
        out.update(blocks.prefixed(encoder, blocks.stack(theirs, scanned, stacked="encoderblock",
                                                         layer="encoderblock_{}")))
    if check:
        out = {k: np.asarray(v, order="C") for k, v in out.items()}
        blocks.check_keys(out, expected_shapes(m, scanned=scanned), "params do not match the model config",
                          WeightsError)
    return out


def import_weights(path: str, *, scan: bool = True) -> tuple[ml_collections.ConfigDict, dict]:
    """``(config.model, params)`` from a big_vision SigLIP / SigLIP 2 ``.npz`` (``naflex_vit`` image towers
    too: ``bigvision_naflex``)."""
    flat, seq_len = read_npz(path), 0
    if bigvision_naflex.is_naflex(flat):
        flat, seq_len = bigvision_naflex.to_vit(flat)
    m = model_config_from_npz(flat, scan=scan)
    m.image.seq_len = seq_len
    return m, params_from_npz(flat, m)


def export_weights(params: Any, model_config: ml_collections.ConfigDict, path: str, *, scanned: bool = False,
                   prefix: bool = True) -> None:
    """Writes ``params`` as a big_vision ``.npz`` (``params/`` prefixed unless ``prefix=False``); a NaFlex
    model (``model.image.seq_len`` > 0) with a ``naflex_vit`` image tower."""
    out = state_dict_from_params(params, model_config, scanned=scanned)
    if model_config.image.get("seq_len", 0) > 0:
        out = bigvision_naflex.from_vit(out)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **{("params/" if prefix else "") + k: v for k, v in out.items()})
