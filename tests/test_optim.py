"""The optimizer: OpenCLIP's weight-decay mask, decoupled decay, per-tower rates, LiT, schedules."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from clipjax import optim
from clipjax.config import base_config, validate
from clipjax.models import build_model, dummy_inputs
from helpers import tiny_config


def _tiny(**optim_overrides):
    """A tiny validated config and its initial params (built once; they do not depend on optim)."""
    c = _config(**optim_overrides)
    return c, _params()


@functools.cache
def _params():
    c = _config()
    images, ids = dummy_inputs(c.model)
    init = jax.jit(lambda: build_model(c.model).init(jax.random.key(0), images, ids))
    return nn.unbox(init())["params"]


def _config(**optim_overrides):
    overrides = {"optim.warmup_steps": 0, "optim.schedule": "constant", "optim.clip_norm": 0.0, "mesh.data": 1}
    c = tiny_config(batch=8, **overrides, **{f"optim.{k}": v for k, v in optim_overrides.items()})
    validate(c, 1)
    return c


def _named(tree) -> dict[str, np.ndarray]:
    return {"/".join(optim._path_names(p)): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _step(c, params, grads):
    tx, _ = optim.make_optimizer(c.optim, total_steps=10)

    @jax.jit
    def step(params, grads):
        updates, state = tx.update(grads, tx.init(params), params)
        return jax.tree.map(jnp.add, params, updates), state

    new_params, state = step(params, grads)
    return _named(new_params), state


def test_decay_mask_is_openclips():
    _, params = _tiny()
    mask = _named(optim.weight_decay_mask(params))
    decayed = {name for name, m in mask.items() if m}
    # OpenCLIP decays matrices only: no biases, norms, embeddings, class token or logit scale.
    assert decayed == {name for name in mask if name.endswith("kernel") or name.rsplit("/", 1)[-1] == "proj"}
    assert "image/patch_kernel" in decayed and "text/transformer/blocks/mlp/fc_kernel" in decayed
    for kept in ("text/token_embedding", "image/pos_embedding", "image/class_token", "logit_scale",
                 "image/ln_pre/scale", "text/transformer/blocks/attn/query_bias"):
        assert kept in mask and kept not in decayed


def test_decay_is_decoupled_and_masked():
    lr, wd = 0.1, 0.5
    c, params = _tiny(lr=lr, weight_decay=wd)
    after, _ = _step(c, params, jax.tree.map(jnp.zeros_like, params))  # Adam moves nothing on zero gradients
    before, mask = _named(params), _named(optim.weight_decay_mask(params))
    for name, w in before.items():
        want = w * (1 - lr * wd) if mask[name] else w
        np.testing.assert_allclose(after[name], want, rtol=1e-6, atol=1e-7, err_msg=name)


def test_tower_learning_rate_multipliers():
    lr = 1e-2
    c, params = _tiny(lr=lr, weight_decay=0.0, image_lr_mult=0.25, text_lr_mult=3.0)
    after, _ = _step(c, params, jax.tree.map(jnp.ones_like, params))  # Adam's first step: -lr * mult
    for name, w in _named(params).items():
        mult = {"image": 0.25, "text": 3.0}.get(name.split("/")[0], 1.0)
        np.testing.assert_allclose(after[name] - w, -lr * mult, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("tower", ["image", "text"])
def test_locked_tower_never_moves_and_holds_no_adam_moments(tower):
    c, params = _tiny(lr=1e-2, **{f"lock_{tower}": True})
    after, state = _step(c, params, jax.tree.map(jnp.ones_like, params))
    other = "text" if tower == "image" else "image"
    for name, w in _named(params).items():
        if name.startswith(tower + "/"):
            np.testing.assert_array_equal(after[name], w, err_msg=name)
        elif name.startswith(other + "/"):
            assert np.abs(after[name] - w).max() > 0, name
    free_c, free_params = _tiny(lr=1e-2)
    _, free_state = _step(free_c, free_params, jax.tree.map(jnp.ones_like, free_params))
    tower_size = sum(v.size for k, v in _named(params).items() if k.startswith(tower + "/"))
    moments = lambda s: sum(x.size for x in jax.tree.leaves(s))
    assert moments(free_state) - moments(state) == 2 * tower_size  # mu and nu of the locked tower


def test_schedules_golden_values():
    o = base_config().optim
    o.update(lr=1.0, warmup_steps=10, schedule="rsqrt")
    s = optim.make_schedule(o, total_steps=1000)
    np.testing.assert_allclose([float(s(t)) for t in (0, 5, 10, 40, 160)],
                               [0.0, 0.5, 1.0, math.sqrt(10 / 40), math.sqrt(10 / 160)], rtol=1e-6)
    o.update(schedule="cosine", min_lr_ratio=0.1)
    s = optim.make_schedule(o, total_steps=110)
    np.testing.assert_allclose([float(s(t)) for t in (5, 10, 60, 110)], [0.5, 1.0, 0.55, 0.1], rtol=1e-6)
    o.update(schedule="constant")
    s = optim.make_schedule(o, total_steps=110)
    np.testing.assert_allclose([float(s(t)) for t in (5, 10, 1000)], [0.5, 1.0, 1.0], rtol=1e-6)
