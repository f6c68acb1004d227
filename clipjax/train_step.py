"""Train state, its sharded initialisation, and the jitted train step.

The step is a pure function ``(state, batch) -> (state, metrics)``. With
``grad_accum = k > 1`` it uses the embedding-cache method, which is exact for
contrastive losses (negatives come from the whole batch):

1. embed every micro-batch without gradients;
2. take the loss and its gradient with respect to the embeddings (and the
   scale/bias) over the full global batch;
3. re-embed each micro-batch and back-propagate its slice of that gradient.

Dimension letters: B global batch, K micro-batches, M micro-batch, E embed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from clipjax import host_env, locca, losses, optim, sharding
from clipjax.data import resize
from clipjax.models import CLIP, build_model, dummy_inputs, num_kept, random_keep
from clipjax.models.naflex import random_keep_valid
from clipjax.stages import Phase, data_config, final_phase

_MASK_STREAM = 1  # fold_in tag of the patch masks within a step's randomness

# A library user driving the step from Python gets the tools' heap behaviour on the CPU
# (before JAX's first computation, as ``host_env.reuse_heap`` needs).
host_env.reuse_heap()

@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of completed steps
    params: Any
    opt_state: Any
    consecutive_skips: jax.Array  # int32: non-finite steps in a row
    total_skips: jax.Array  # int32: non-finite steps since the start


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything static a run needs: model, optimizer, mesh and shardings."""

    config: Any
    model: CLIP
    tx: optax.GradientTransformation
    schedule: Callable
    mesh: jax.sharding.Mesh
    rules: tuple
    state_shardings: TrainState
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
    decoder_loss: locca.DecoderLoss | None = None  # the LocCa objective beside the contrastive one

    def batch_shardings(self, phase: Phase | None = None) -> dict[str, NamedSharding]:
        """The shardings of the batch fields of ``phase`` (default: the model's own sizes)."""
        config = self.config if phase is None else data_config(self.config, phase)
        return {key: sharding.batch_sharding(self.mesh, len(shape) + 1)
                for key, (shape, _) in batch_spec(config).items()}


def batch_spec(config) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Per-example shape and dtype of each train batch field (what the input pipeline yields)."""
    text = {"text": ((config.model.text.context_length,), jnp.int32)}
    length, patch = config.model.image.get("seq_len", 0), config.model.image.patch_size
    if length:  # NaFlex (models/naflex.py)
        spec = {"patches": ((length, patch * patch * 3), jnp.uint8), "patch_yx": ((length, 2), jnp.int32),
                "patch_valid": ((length,), jnp.bool_), **text}
    else:
        p = config.data.buffer_size
        spec = {"image": ((p, p, 3), jnp.uint8), "image_box": ((4,), jnp.float32), "image_hw": ((2,), jnp.int32),
                **text}
    if config.model.decoder.enabled:  # data.locca's targets: max_length inputs and the last target
        length = config.model.decoder.max_length + 1
        spec.update(dec_ids=((length,), jnp.int32), dec_target=((length,), jnp.bool_))
    return spec


def make_setup(config, mesh: jax.sharding.Mesh) -> Setup:
    """Builds model and optimizer and derives the state's shardings without allocating it."""
    model = build_model(config.model)
    tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
    rules = sharding.rules_from_config(config.sharding.rules)
    images, ids = dummy_inputs(config.model)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), images, ids))["params"]
    param_sh = sharding.param_shardings(boxed, mesh, rules)
    abstract_params = nn.unbox(boxed)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    repl = sharding.replicated(mesh)
    # Every param-shaped tree in the optimizer state (Adam moments...) is sharded like the params;
    # multi_transform leaves MaskedNodes where another tower's transform owns the param.
    masked = lambda x: isinstance(x, optax.MaskedNode)
    opt_sh = optax.tree_map_params(tx, lambda x, sh: x if masked(x) else sh, abstract_opt, param_sh,
                                   transform_non_params=lambda _: repl, is_leaf=masked)
    state_sh = TrainState(step=repl, params=param_sh, opt_state=opt_sh, consecutive_skips=repl, total_skips=repl)
    abstract = jax.eval_shape(functools.partial(_init_state, model, tx, config), jax.random.key(0))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    return Setup(config, model, tx, schedule, mesh, rules, state_sh, abstract, locca.DecoderLoss.from_config(config))


def _init_state(model: CLIP, tx, config, rng: jax.Array, params: Any = None) -> TrainState:
    if params is None:
        images, ids = dummy_inputs(config.model)
        # The first key of a split, as since the first release: a seed keeps giving the same weights.
        params = nn.unbox(model.init(jax.random.split(rng)[0], images, ids))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      consecutive_skips=jnp.zeros((), jnp.int32), total_skips=jnp.zeros((), jnp.int32))


def init_state(setup: Setup, seed: int, params: Any = None) -> TrainState:
    """Creates the state directly in its sharded layout (unsharded weights never exist).

    ``params`` (already sharded, e.g. from a fine-tuning checkpoint) replace the
    random initialisation.
    """
    fn = functools.partial(_init_state, setup.model, setup.tx, setup.config)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        if params is None:
            return jax.jit(fn, out_shardings=setup.state_shardings)(jax.random.key(seed))
        return jax.jit(lambda r, p: fn(r, p), out_shardings=setup.state_shardings)(jax.random.key(seed), params)


def _split_micro(x: jax.Array, k: int) -> jax.Array:
    """[B, ...] -> [K, M, ...] taking every K-th row, so each device keeps its rows local."""
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    return jax.lax.with_sharding_constraint(x, P(None, sharding.BATCH_AXES))


def _merge_micro(x_KM: jax.Array) -> jax.Array:
    """Inverse of `_split_micro`."""
    x = jnp.swapaxes(x_KM, 0, 1)
    x = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    return jax.lax.with_sharding_constraint(x, P(sharding.BATCH_AXES))


def mask_rng(seed: int, step: jax.Array) -> jax.Array:
    """The key of a step's patch masks: ``fold_in(key(seed), step)``, so a resumed run draws the same masks."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _MASK_STREAM), step)


def patch_keep(config, phase: Phase, batch: dict[str, jax.Array], rng: jax.Array) -> jax.Array | None:
    """int32 ``[B, K]`` kept patches per example in ``phase`` (None: no masking), sharded over the batch.

    NaFlex examples drop a share of their own patches, never counting padding as kept.
    """
    if not phase.mask_ratio:
        return None
    if phase.seq_len:
        keep_BK = random_keep_valid(rng, batch["patch_valid"], phase.mask_ratio)
        return jax.lax.with_sharding_constraint(keep_BK, P(sharding.BATCH_AXES))
    patches = (phase.image_size // config.model.image.patch_size) ** 2
    keep_BK = random_keep(rng, batch["text"].shape[0], patches, num_kept(patches, phase.mask_ratio))
    return jax.lax.with_sharding_constraint(keep_BK, P(sharding.BATCH_AXES))


def loss_and_grads(setup: Setup, params: Any, batch: dict[str, jax.Array], keep_BK: jax.Array | None,
                   phase: Phase | None = None,
                   dec: dict[str, jax.Array] | None = None) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """``(loss, loss metrics, grads)`` of a global batch; ``keep_BK``: FLIP's kept patches or None.

    ``dec`` (``locca.DecoderLoss.prepare``): the decoder's inputs; its loss is added to the
    contrastive one. Per example, so with micro-batches each adds its share in the second pass.
    """
    config, model = setup.config, setup.model
    phase = phase or final_phase(config)
    k = config.train.grad_accum
    lc = config.loss
    dtype = jnp.dtype(config.model.dtype)
    interpolation = config.data.interpolation

    def embed(params, crops, ids, keep, dec=None):
        """``(zimg, ztxt)``, and with ``dec`` the decoder's per-task NLL sums (``locca.DecoderLoss.nll_sums``)."""
        # A locked tower (LiT) gets no gradient at all: cheaper, and it stays out of clipping.
        params = dict(params)
        for tower, locked in (("image", config.optim.lock_image), ("text", config.optim.lock_text)):
            if locked:
                params[tower] = jax.lax.stop_gradient(params[tower])
        v = {"params": params}
        images = resize.model_images(crops, phase.image_size, interpolation, config.model.image.norm, dtype)
        ztxt = model.apply(v, ids, method=CLIP.encode_text)
        if dec is None:
            return model.apply(v, images, keep, method=CLIP.encode_image), ztxt
        zimg, tokens_BPD = model.apply(v, images, keep, method=CLIP.encode_image_tokens)
        decode = functools.partial(model.apply, v, method=CLIP.decode)
        return zimg, ztxt, setup.decoder_loss.nll_sums(decode, tokens_BPD, dec)

    def add_decoder(loss, metrics, nll_K):
        dec_loss, dec_metrics = setup.decoder_loss.loss(nll_K, dec)
        return loss + dec_loss, {**metrics, "contrastive_loss": loss, **dec_metrics}

    def scale_bias(params):
        return model.apply({"params": params}, method=CLIP.scale_and_bias)

    def loss_from_embeddings(zimg, ztxt, params):
        scale, bias = scale_bias(params)
        return losses.contrastive_loss(zimg, ztxt, scale, bias, kind=lc.kind, impl=lc.impl, mesh=setup.mesh,
                                       chunk_size=lc.chunk_size, text_key=text_key)

    text_key = losses.text_keys(batch["text"])  # identical captions count as right in the in-batch accuracy
    crops = resize.image_fields(batch)  # uint8 crop buffers with their boxes, resized inside `embed`
    if k == 1:
        def full_loss(p):
            zimg, ztxt, *nll = embed(p, crops, batch["text"], keep_BK, dec)
            loss, metrics = loss_from_embeddings(zimg, ztxt, p)
            return add_decoder(loss, metrics, nll[0]) if dec is not None else (loss, metrics)

        (loss, metrics), grads = jax.value_and_grad(full_loss, has_aux=True)(params)
        return loss, metrics, grads
    # Each micro-batch keeps its own rows' masks in both passes, so the two embeddings agree.
    crops_K = jax.tree.map(lambda x: _split_micro(x, k), crops)
    ids_K = _split_micro(batch["text"], k)
    keep_K = None if keep_BK is None else _split_micro(keep_BK, k)
    zimg_K, ztxt_K = jax.lax.map(lambda xs: embed(jax.lax.stop_gradient(params), *xs), (crops_K, ids_K, keep_K))
    zimg, ztxt = _merge_micro(zimg_K), _merge_micro(ztxt_K)
    (loss, metrics), (g_zimg, g_ztxt, grads_sb) = jax.value_and_grad(
        loss_from_embeddings, argnums=(0, 1, 2), has_aux=True)(zimg, ztxt, params)
    g_zimg_K, g_ztxt_K = _split_micro(g_zimg, k), _split_micro(g_ztxt, k)
    dec_K = None if dec is None else jax.tree.map(lambda x: _split_micro(x, k), dec)
    # The decoder loss is a sum over examples scaled by a constant (weight / target tokens in the
    # global batch): each micro-batch's cotangent of its NLL sums is that constant, known up front.
    g_nll = None if dec is None else jax.grad(lambda n: setup.decoder_loss.loss(n, dec)[0])(
        jnp.zeros((len(locca.TASKS),), jnp.float32))

    def accumulate(carry, xs):
        grads, nll_K = carry
        crops, ids, keep, gi, gt, dec_m = xs
        out, vjp = jax.vjp(lambda p: embed(p, crops, ids, keep, dec_m), params)
        (g,) = vjp((gi.astype(zimg.dtype), gt.astype(ztxt.dtype), *([] if dec_m is None else [g_nll])))
        return (jax.tree.map(jnp.add, grads, g), nll_K + (0.0 if dec_m is None else out[2])), None

    nll0 = jnp.zeros((len(locca.TASKS),), jnp.float32)
    (grads, nll_K), _ = jax.lax.scan(accumulate, (grads_sb, nll0), (crops_K, ids_K, keep_K, g_zimg_K, g_ztxt_K, dec_K))
    if dec is not None:
        loss, metrics = add_decoder(loss, metrics, nll_K)
    return loss, metrics, grads


def train_step(setup: Setup, state: TrainState, batch: dict[str, jax.Array],
               phase: Phase | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch (fields: ``batch_spec``; images as in ``resize.py``).

    ``phase`` (default: the model's sizes and ``model.image.mask_ratio``) sets the
    image size, text length and mask ratio; see ``clipjax.stages``.
    """
    config = setup.config
    phase = phase or final_phase(config)
    params = state.params
    keep_BK = patch_keep(config, phase, batch, mask_rng(config.seed, state.step))
    dec = None if setup.decoder_loss is None else setup.decoder_loss.prepare(batch, state.step)
    loss, metrics, grads = loss_and_grads(setup, params, batch, keep_BK, phase, dec)

    # The one pass over the gradients besides the update: clipping reuses this norm.
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(params, opt_state):
        updates, new_opt = setup.tx.update(grads, opt_state, params, grad_norm=grad_norm)
        return optim.clamp_logit_scale(optax.apply_updates(params, updates), config.model.max_logit_scale), new_opt

    # A non-finite step leaves weights and optimizer state exactly as they were. A cond rather
    # than a select of new against old: the select reads the old buffers after the update has
    # started overwriting them in place, so XLA copies every parameter and moment first.
    new_params, new_opt = jax.lax.cond(finite, update, lambda p, o: (p, o), params, state.opt_state)
    skips = jnp.where(finite, 0, state.consecutive_skips + 1).astype(jnp.int32)
    new_state = TrainState(
        step=state.step + 1, params=new_params, opt_state=new_opt,
        consecutive_skips=skips, total_skips=state.total_skips + (~finite).astype(jnp.int32))
    out = {f"train/{name}": value for name, value in metrics.items()}
    out.update({
        "train/loss": loss,
        # The optimizer counts applied updates only, so skipped steps do not advance the schedule.
        "train/lr": setup.schedule(state.step - state.total_skips),
        "train/grad_norm": grad_norm,
        "train/finite": finite,
        "train/consecutive_skips": skips,
        "train/skipped_steps": new_state.total_skips,
    })
    return new_state, out


def compile_train_step(setup: Setup, phase: Phase | None = None):
    """The jitted step with explicit shardings and the state donated; returns the lowered+compiled executable.

    ``phase`` (default ``stages.final_phase``): the sizes and mask ratio it is compiled for.
    """
    phase = phase or final_phase(setup.config)
    batch_sh = setup.batch_shardings(phase)
    step = jax.jit(
        functools.partial(train_step, setup, phase=phase),
        in_shardings=(setup.state_shardings, batch_sh),
        out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
        donate_argnums=(0,),
    )
    b = setup.config.train.batch_size
    abstract_batch = {key: jax.ShapeDtypeStruct((b, *shape), dtype, sharding=batch_sh[key])
                      for key, (shape, dtype) in batch_spec(data_config(setup.config, phase)).items()}
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        return step.lower(setup.abstract_state, abstract_batch).compile()
