"""The optimizer: AdamW with OpenCLIP's masking, schedules, per-tower rates, LiT locking."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "rsqrt", "constant")
# Parameter names that never get weight decay (besides biases and norms).
NO_DECAY_NAMES = ("token_embedding", "pos_embedding", "class_token", "probe", "logit_scale", "logit_bias")


def make_schedule(o, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``o.lr``, then cosine to ``lr * min_lr_ratio``, rsqrt, or constant."""
    warmup = int(o.warmup_steps)
    lr = float(o.lr)
    if o.schedule == "cosine":
        decay_steps = max(total_steps - warmup, 1)
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(o.min_lr_ratio))
    elif o.schedule == "rsqrt":
        # join_schedules also evaluates this before the boundary (negative steps): clamp them.
        after = lambda step: lr * jnp.sqrt(max(warmup, 1) / (jnp.maximum(step, 0) + max(warmup, 1)))
    elif o.schedule == "constant":
        after = optax.constant_schedule(lr)
    else:
        raise ValueError(f"optim.schedule={o.schedule!r}; choose one of {list(SCHEDULES)}")
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def weight_decay_mask(params: Any) -> Any:
    """True for matrix weights (kernels, projections); False for biases, norms, embeddings, scale, bias."""

    def decay(path, _):
        names = _path_names(path)
        leaf = names[-1]
        if any(n in NO_DECAY_NAMES for n in names):
            return False
        if any(n.startswith("ln") for n in names) or leaf in ("scale", "bias") or leaf.endswith("_bias"):
            return False
        return True

    return jax.tree_util.tree_map_with_path(decay, params)


def tower_labels(params: Any, o) -> Any:
    """"image" / "text" / "head" per leaf, with "frozen" for a locked tower."""

    def label(path, _):
        top = _path_names(path)[0]
        if top == "image":
            return "frozen" if o.lock_image else "image"
        if top == "text":
            return "frozen" if o.lock_text else "text"
        return "head"

    return jax.tree_util.tree_map_with_path(label, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """``optax.clip_by_global_norm`` (same state, same arithmetic) that can reuse a known norm.

    ``update(grads, state, params, grad_norm=n)`` clips with ``n`` instead of computing the
    norm again: the train step already has it for its non-finite check, and on a large model
    each norm is a full pass over the gradients.
    """

    def update_fn(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        g_norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
        trigger = jnp.squeeze(g_norm < max_norm)
        updates = jax.tree.map(lambda t: jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm), updates)
        return updates, state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def make_optimizer(o, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW chain: clip (global norm) -> Adam -> decoupled decay (masked) -> -lr * tower multiplier.

    ``update`` accepts ``grad_norm=`` (the gradients' global norm, when the caller has it).

    Locked towers go through ``optax.set_to_zero`` and hold no Adam moments.
    """
    schedule = make_schedule(o, total_steps)

    def adamw(mult: float) -> optax.GradientTransformation:
        return optax.chain(
            optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps, mu_dtype=jnp.float32),
            optax.add_decayed_weights(o.weight_decay, mask=weight_decay_mask),
            optax.scale_by_learning_rate(lambda step: schedule(step) * mult),
        )

    inner = optax.multi_transform(
        {"image": adamw(o.image_lr_mult), "text": adamw(o.text_lr_mult), "head": adamw(1.0),
         "frozen": optax.set_to_zero()},
        lambda params: tower_labels(params, o),
    )
    parts = []
    if o.clip_norm and o.clip_norm > 0:
        parts.append(clip_by_global_norm(o.clip_norm))
    parts.append(inner)
    return optax.chain(*parts), schedule


def clamp_logit_scale(params: dict, max_scale: float) -> dict:
    """Clips the learnable log-scale to at most log(max_scale) (OpenCLIP clamps to ln 100)."""
    if "logit_scale" not in params:
        return params
    out = dict(params)
    out["logit_scale"] = jnp.minimum(params["logit_scale"], math.log(max_scale))
    return out
