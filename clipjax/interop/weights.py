"""Any saved model -> ``(run config, params, step)``: a clipjax run folder or another framework's weights.

``load_saved(path, step=None, model=None)`` is the one dispatch behind ``clipjax.load`` and
``clipjax-convert to-*``. A folder holding ``checkpoints/`` is a clipjax run (its saved
config describes the model, the tokenizer and the preprocessing). Anything else goes to the
first row of ``IMPORTERS`` whose test accepts the path; that module's
``import_weights(path) -> (model_config, params)`` reads it and :func:`run_config` completes
the config. A new format is one row.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any, Callable

import ml_collections

from clipjax.errors import UserError

_OPENCLIP_FILES = (".safetensors", ".bin", ".pt", ".pth")

# (accepts(path), module with import_weights(path[, model])): first match wins.
IMPORTERS: tuple[tuple[Callable[[str], bool], str], ...] = (
    (lambda path: os.path.isfile(path) and path.endswith(_OPENCLIP_FILES), "clipjax.interop.openclip"),
    (lambda path: os.path.isfile(os.path.join(path, "config.json")), "clipjax.interop.hf"),  # save_pretrained
    (lambda path: os.path.isfile(path) and path.endswith(".npz"), "clipjax.interop.bigvision"),
)


@dataclasses.dataclass
class Saved:
    """A model as saved: its run config (validated), float32 host params, the step (None for foreign weights)."""

    config: ml_collections.ConfigDict
    params: Any
    step: int | None


def weights_tokenizer(path: str, model_config) -> str:
    """The ``data.tokenizer`` spec for weights at ``path``: the tokenizer files a transformers folder
    holds, else CLIP's for CLIP's vocabulary, else bytes."""
    for name, kind in (("tokenizer.json", "hf"), ("spiece.model", "sentencepiece")):
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, name)):
            return f"{kind}:{os.path.join(path, name)}"
    return "clip" if model_config.text.vocab_size == 49408 else "bytes"


def run_config(model_config, tokenizer: str | None = None) -> ml_collections.ConfigDict:
    """A validated ``base_config()`` running ``model_config``: ``tokenizer`` (default CLIP's for CLIP's
    vocabulary), the sigmoid loss when the model has a logit bias, OpenCLIP's eval crop."""
    from clipjax import config as config_lib

    c = config_lib.base_config()
    c.model = model_config
    c.data.tokenizer = tokenizer or ("clip" if model_config.text.vocab_size == 49408 else "bytes")
    c.loss.kind = "sigmoid" if model_config.init_logit_bias is not None else "softmax"
    if "eval_crop" in c.data:
        c.data.eval_crop = "openclip"
    return config_lib.validate(c)


def is_run_folder(path: str) -> bool:
    from clipjax import checkpoint as ckpt_lib

    return os.path.isdir(ckpt_lib.checkpoint_dir(path))


def load_saved(path: str, step: int | None = None, model: Any = None) -> Saved:
    """The model saved at ``path``: a clipjax run folder (``step``: default the latest) or a weights file
    of a format in ``IMPORTERS`` (``model``: what its tensor shapes cannot tell, e.g. an OpenCLIP name)."""
    path = os.fspath(path)
    if is_run_folder(path):
        return _load_run(path, step)
    if step is not None:
        raise UserError(f"step={step}: {path} is not a clipjax run folder (no checkpoints/), so it has no steps")
    for accepts, module_name in IMPORTERS:
        if accepts(path):
            module = importlib.import_module(module_name)
            model_config, params = module.import_weights(path) if model is None else module.import_weights(path, model)
            return Saved(run_config(model_config, weights_tokenizer(path, model_config)), params, None)
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or folder (expected a clipjax run folder or a weights file)")
    raise UserError(f"{path}: neither a clipjax run folder (no checkpoints/ inside) nor a weights file clipjax "
                    f"reads ({', '.join(_OPENCLIP_FILES)} from OpenCLIP)")


def _load_run(workdir: str, step: int | None) -> Saved:
    import jax
    from flax import linen as nn

    from clipjax import checkpoint as ckpt_lib
    from clipjax.models import build_model, dummy_inputs

    checkpointer = ckpt_lib.Checkpointer(workdir, every=1, keep=1, async_save=False)
    try:
        step = checkpointer.latest_step() if step is None else int(step)
        saved = None if step is None else checkpointer.saved_config(step)
    finally:
        checkpointer.close()
    step_dir = os.path.join(ckpt_lib.checkpoint_dir(workdir), str(step))
    if step is None or not os.path.isdir(step_dir):
        raise UserError(f"{workdir}: no checkpoint" + (f" at step {step}" if step is not None else "")
                        + f" (steps saved: {_steps(workdir) or 'none'})")
    if saved is None:
        raise UserError(f"{step_dir} holds no config, so its model is unknown")
    config = ml_collections.ConfigDict(json.loads(saved))
    model = build_model(config.model)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(config.model)))["params"]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), nn.unbox(boxed))
    return Saved(config, jax.device_get(ckpt_lib.load_params(step_dir, abstract)), step)


def _steps(workdir: str) -> str:
    from clipjax import checkpoint as ckpt_lib

    folder = ckpt_lib.checkpoint_dir(workdir)
    return ", ".join(sorted((d for d in os.listdir(folder) if d.isdigit()), key=int))
