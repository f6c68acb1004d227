"""FLIP patch masking: gradients against a hand-gathered reference, config checks, phases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from clipjax import sharding, stages
from clipjax.config import validate
from clipjax.data import resize
from clipjax.models import CLIP
from clipjax.models.layers import LayerNorm, Transformer
from clipjax.models.towers import MapHead
from clipjax.models import random_keep
from clipjax.train_step import init_state, loss_and_grads, make_setup, mask_rng, patch_keep
from helpers import make_batch, tiny_config


def masked_config(pool="tok", ratio=0.5, **overrides):
    # 16 px in 4 px patches: 16 patches, of which 8 (0.5) or 4 (0.75) are kept.
    return tiny_config(**{"model.image.image_size": 16, "model.image.patch_size": 4, "model.image.pool": pool,
                          "model.image.mask_ratio": ratio, **overrides})


def hand_image_embeddings(c, params, images_BHWC, keep_BK):
    """The image tower on each example's kept patches, cut out one by one with numpy indices."""
    m, p_img = c.model.image, params["image"]
    p, cols = m.patch_size, images_BHWC.shape[2] // m.patch_size
    rows = []
    for i, keep in enumerate(np.asarray(keep_BK)):
        patches = [images_BHWC[i, (k // cols) * p:(k // cols + 1) * p, (k % cols) * p:(k % cols + 1) * p].reshape(-1)
                   for k in keep]
        tokens = jnp.stack(patches) @ p_img["patch_kernel"] + p_img["pos_embedding"][1 + keep]
        cls = p_img["class_token"] + p_img["pos_embedding"][0]
        rows.append(jnp.concatenate([cls[None], tokens]))
    x = jnp.stack(rows)
    eps, heads = c.model.ln_eps, m.heads
    x = LayerNorm(eps).apply({"params": p_img["ln_pre"]}, x)
    x = Transformer(m.depth, heads, m.width // heads, m.mlp_dim, c.model.act, eps, remat=c.model.remat,
                    scan=c.model.scan).apply({"params": p_img["transformer"]}, x)
    x = LayerNorm(eps).apply({"params": p_img["ln_post"]}, x)
    if m.pool == "tok":
        z = x[:, 0]
    elif m.pool == "gap":
        z = jnp.mean(x[:, 1:], axis=1)
    else:
        z = MapHead(heads, m.mlp_dim, c.model.act, eps).apply({"params": p_img["map_head"]}, x)
    z = z @ p_img["proj"]
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)


def hand_loss(c, model, params, images_BHWC, ids_BT, keep_BK):
    zimg = hand_image_embeddings(c, params, images_BHWC, keep_BK)
    ztxt = model.apply({"params": params}, ids_BT, method=CLIP.encode_text)
    scale = jnp.exp(jnp.minimum(params["logit_scale"], np.log(c.model.max_logit_scale)))
    logits = scale * zimg @ ztxt.T
    labels = jnp.arange(logits.shape[0])
    ce = lambda lg: -jnp.mean(jax.nn.log_softmax(lg, axis=1)[labels, labels])
    return (ce(logits) + ce(logits.T)) / 2


def _rel(a, b):
    """Largest leaf-wise max |a - b| / max |b|; a floor of 1e-3 keeps exactly-zero gradients (key bias) out."""
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / max(float(np.max(np.abs(np.asarray(y)))), 1e-3))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("pool,ratio,overrides", [
    ("tok", 0.5, {}),
    ("gap", 0.75, {"train.grad_accum": 2, "model.remat": "full"}),
    ("map", 0.5, {"model.scan": False}),
])
@pytest.mark.slow
def test_masked_step_gradients_equal_hand_gathered_reference(devices, pool, ratio, overrides):
    c = masked_config(pool, ratio, **overrides)
    validate(c, 8)
    setup = make_setup(c, sharding.mesh_from_config(c.mesh, devices))
    state = init_state(setup, 0)
    phase = stages.final_phase(c)
    batch = make_batch(c, 0)
    b = c.train.batch_size

    def step_grads(state, batch):  # exactly what train_step draws and differentiates
        keep = patch_keep(c, phase, batch, mask_rng(c.seed, state.step))
        return (keep, *loss_and_grads(setup, state.params, batch, keep, phase))

    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        keep, loss, _, grads = jax.jit(step_grads)(state.replace(step=jnp.int32(3)), batch)
    keep = np.asarray(keep)
    num_keep = int(16 * (1 - ratio))
    # Step 3's masks come from fold_in(fold_in(key(seed), 1), 3): another draw than step 0's.
    hand_keep = lambda step: np.asarray(random_keep(
        jax.random.fold_in(jax.random.fold_in(jax.random.key(c.seed), 1), step), b, 16, num_keep))
    np.testing.assert_array_equal(keep, hand_keep(3))
    assert np.any(hand_keep(0) != hand_keep(3))
    assert keep.shape == (b, num_keep)
    assert all(len(set(row)) == num_keep for row in keep.tolist())  # distinct patches per example
    assert len({tuple(row) for row in keep.tolist()}) > 1  # a subset per example, not one for all

    params = jax.device_get(state.params)
    images = resize.model_images(resize.image_fields(batch), 16)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(
        lambda p: hand_loss(c, setup.model, p, images, batch["text"], keep)))(params)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    assert _rel(grads, ref_grads) < 1e-4
    # Positive control: all 16 patches give other gradients, so the comparison can see a wrong subset.
    all_patches = np.tile(np.arange(16), (b, 1))
    unmasked = jax.jit(jax.grad(lambda p: hand_loss(c, setup.model, p, images, batch["text"], all_patches)))(params)
    assert _rel(unmasked["image"], ref_grads["image"]) > 1e-2


def test_mask_ratio_and_stages_are_validated():
    for ratio, match in ((1.0, r"mask_ratio=1.0 must be in \[0, 1\)"), (-0.1, "must be in"),
                         (0.97, "keeps no patch of the 16")):
        with pytest.raises(ValueError, match=match):
            validate(masked_config(ratio=ratio))
    bad = {
        "train.unmasked_steps": (11, r"train.unmasked_steps=11 must be in \[0, train.steps=10\]"),
        "train.stages": (((4, 10, 8),), r"train.stages\[0\]=\(4, 10, 8\): image_size must be a positive multiple"),
    }
    for key, (value, match) in bad.items():
        with pytest.raises(ValueError, match=match):
            validate(masked_config(**{key: value}))
    for value, match in ((((4, 8, 9),), r"context_length must be in \[2, model.text.context_length=8\]"),
                         (((4, 8),), "each stage is"), (((0, 8, 4),), "steps must be positive"),
                         (((6, 8, 4), (5, 8, 4)), "train.stages last 11 steps, more than train.steps=10")):
        with pytest.raises(ValueError, match=match):
            validate(masked_config(**{"train.stages": value}))


def test_phases_cover_the_run_in_order():
    c = validate(masked_config(ratio=0.75, **{"train.stages": ((3, 8, 4), (2, 12, 6)), "train.unmasked_steps": 4}))
    P = stages.Phase
    assert stages.phases(c) == [(0, 3, P(8, 4, 0.75)), (3, 5, P(12, 6, 0.75)), (5, 6, P(16, 8, 0.75)),
                                (6, 10, P(16, 8, 0.0))]
    assert stages.phase_at(c, 4) == P(12, 6, 0.75) and stages.phase_at(c, 9) == P(16, 8, 0.0)
    plain = validate(tiny_config())
    assert stages.phases(plain) == [(0, 10, P(16, 8, 0.0))]
    data_cfg = stages.data_config(c, P(8, 4, 0.75))
    assert (data_cfg.model.image.image_size, data_cfg.model.text.context_length) == (8, 4)
    assert c.model.image.image_size == 16  # the run's config is untouched
