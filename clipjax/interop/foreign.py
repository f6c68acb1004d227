"""Another framework's weights as the params of a model being built (``checkpoint.init_from``): one
loader over the formats of ``openclip``, ``hf`` and ``bigvision``, checked key by key."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from clipjax.interop import openclip
from clipjax.interop.blocks import WeightsError

log = logging.getLogger("clipjax")


def load_params(path: str, abstract_params: Any, *, init_logit_bias: float | None = None) -> Any:
    """A weights file's params on ``abstract_params``'s structure and shardings (``checkpoint.init_from``):
    OpenCLIP/OpenAI files, a transformers directory (``config.json``) or a big_vision ``.npz``.

    Head counts and the stacked/unrolled block layout come from ``abstract_params``; a
    logit bias the file lacks starts at ``init_logit_bias`` (0 when None), one the model
    lacks is dropped.
    """
    import jax
    from flax import traverse_util

    want = traverse_util.flatten_dict(abstract_params, sep="/")
    scan = any("/blocks/" in k for k in want)
    if os.path.isdir(path) or path.endswith("config.json"):
        from clipjax.interop import hf

        _, params = hf.import_weights(path, scan=scan)
    elif path.endswith(".npz"):
        from clipjax.interop import bigvision

        _, params = bigvision.import_weights(path, scan=scan)
    else:
        heads = {}
        for tower in ("image", "text"):
            key = next(k for k in want if k.startswith(f"{tower}/transformer/") and k.endswith("attn/query_kernel"))
            heads[tower] = want[key].shape[-2]
        _, params = openclip.import_weights(path, openclip.Arch(image_heads=heads["image"], text_heads=heads["text"]),
                                            scan=scan)
    got = traverse_util.flatten_dict(params, sep="/")
    if "logit_bias" in want and "logit_bias" not in got:
        got["logit_bias"] = np.asarray(init_logit_bias or 0.0, np.float32)
        log.info("%s has no logit_bias; it starts at %s", path, float(got["logit_bias"]))
    if "logit_bias" in got and "logit_bias" not in want:
        del got["logit_bias"]
        log.info("%s has a logit_bias; this model has none, so it is dropped", path)
    wrong = [f"{k}: file {got[k].shape} vs model {tuple(want[k].shape)}" for k in want
             if k in got and got[k].shape != tuple(want[k].shape)]
    missing = sorted(set(want) - set(got))
    if wrong or missing:
        hint = ""
        if any(k.startswith("image/pos_embedding") for k in wrong):
            hint = " (model.image.image_size / patch_size must match the file's)"
        raise WeightsError("weights do not fit this model: " + "; ".join(wrong + missing)[:600] + hint)
    return jax.tree.map(lambda a, k: jax.make_array_from_callback(a.shape, a.sharding, lambda idx: got[k][idx]),
                        abstract_params, traverse_util.unflatten_dict({k: k for k in want}, sep="/"))
