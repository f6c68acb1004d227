"""The jitted train step: exact gradient accumulation, mesh invariance, NaN skipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clipjax import sharding
from clipjax.config import validate
from clipjax.train_step import compile_train_step, init_state, make_setup
from helpers import make_batch, run_steps, tiny_config


def _max_rel(a, b):
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y))) /
                                            (np.max(np.abs(np.asarray(y))) + 1e-12)), a, b)
    return max(jax.tree.leaves(diffs))


def _global_rel(a, b, origin):
    """max |(a - o) - (b - o)| / max |b - o| over the whole tree: relative error of the update."""
    num = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    den = max(float(np.max(np.abs(np.asarray(y) - np.asarray(o))))
              for y, o in zip(jax.tree.leaves(b), jax.tree.leaves(origin)))
    return num / den


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.slow
def test_grad_accumulation_equals_one_big_batch(devices, impl):
    # eps=1 keeps Adam's first steps linear in the gradient, so comparing updates compares
    # gradients (with the default eps Adam turns float noise in near-zero gradients, e.g. the
    # key bias whose exact gradient is 0, into full-size updates).
    opts = {"loss.impl": impl, "optim.eps": 1.0, "optim.weight_decay": 0.0, "optim.warmup_steps": 0}
    batches = [make_batch(tiny_config(batch=32), 0)]
    c = tiny_config(batch=32, **opts)
    validate(c, 8)
    init = init_state(make_setup(c, sharding.mesh_from_config(c.mesh, devices)), c.seed).params
    ref, ref_hist = run_steps(tiny_config(batch=32, **opts), batches, devices)
    acc, acc_hist = run_steps(tiny_config(batch=32, **opts, **{"train.grad_accum": 4}), batches, devices)
    for h1, h2 in zip(ref_hist, acc_hist):
        np.testing.assert_allclose(h2["train/loss"], h1["train/loss"], rtol=1e-5)
        np.testing.assert_allclose(h2["train/grad_norm"], h1["train/grad_norm"], rtol=1e-5)
    # float32 sums in another order: ~2e-5 of the update (accumulated gradients 1% off fail this test).
    assert _global_rel(acc.params, ref.params, init) < 5e-5
    # The steps really moved the weights (the comparison above is not vacuous).
    assert ref_hist[0]["train/grad_norm"] > 0


@pytest.mark.slow
def test_eight_devices_equal_one_device(devices):
    """Data, FSDP and tensor parallelism (2 x 2 x 2) together give the one-device steps."""
    batches = [make_batch(tiny_config(), s) for s in range(3)]
    c8 = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "loss.impl": "chunked"})
    c1 = tiny_config(**{"mesh.data": 1, "loss.impl": "chunked"})
    s8, h8 = run_steps(c8, batches, devices)
    s1, h1 = run_steps(c1, batches, devices[:1])
    # The comparison is across a real tensor split: attention heads and MLP columns live on 2 devices each.
    block = s8.params["image"]["transformer"]["blocks"]
    assert block["attn"]["query_kernel"].sharding.spec[2] == "tensor"
    assert block["attn"]["out_kernel"].sharding.spec[1] == "tensor"
    assert block["mlp"]["fc_kernel"].sharding.spec[2] == "tensor"
    for a, b in zip(h8, h1):
        np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=1e-5)
    # Weights agree to float noise; Adam turns noise in exactly-zero gradients (the key bias)
    # into small absolute moves, so compare on the scale of the whole tree.
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)))
    assert diff < 1e-4
    assert h8[2]["train/loss"] != h8[0]["train/loss"]


def test_fsdp_shards_params_and_optimizer_state(devices):
    c = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 4})
    validate(c, 8)
    setup = make_setup(c, sharding.mesh_from_config(c.mesh, devices))
    fc = setup.state_shardings.params["image"]["transformer"]["blocks"]["mlp"]["fc_kernel"]
    assert "fsdp" in jax.tree.leaves(tuple(fc.spec))
    def sharded(tree):
        return sum("fsdp" in str(s.spec) for s in jax.tree.leaves(tree))

    # Adam's mu and nu of each sharded parameter are sharded; nothing else is.
    assert sharded(setup.state_shardings.opt_state) == 2 * sharded(setup.state_shardings.params) > 0


def test_nan_batch_is_skipped_without_touching_weights(devices):
    # Warmup over 4 steps: lr = 1e-2 * n / 4 after n applied updates, so a skipped step shows in the lr.
    c = tiny_config(**{"optim.warmup_steps": 4})
    validate(c, 8)
    setup = make_setup(c, sharding.mesh_from_config(c.mesh, devices))
    state = init_state(setup, 0)
    step = compile_train_step(setup)
    sh = setup.batch_shardings()
    put = lambda batch: {k: jax.device_put(v, sh[k]) for k, v in batch.items()}
    state, m0 = step(state, put(make_batch(c, 2)))
    before = jax.device_get((state.params, state.opt_state))
    bad = make_batch(c, 0)
    bad["image_box"][3, 0] = np.nan  # NaN crop -> NaN image
    state, m = step(state, put(bad))
    after = jax.device_get((state.params, state.opt_state))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), after, before)
    assert not bool(m["train/finite"]) and int(m["train/consecutive_skips"]) == 1
    assert int(state.step) == 2
    state, m = step(state, put(make_batch(c, 1)))
    assert bool(m["train/finite"]) and int(m["train/consecutive_skips"]) == 0 and int(m["train/skipped_steps"]) == 1
    assert _max_rel(jax.device_get(state.params), before[0]) > 0
    # The logged lr is the optimizer's: 1 update applied before the third step (not 2 steps taken).
    assert [float(m0["train/lr"]), float(m["train/lr"])] == pytest.approx([0.0, 1e-2 / 4], abs=1e-9)


def test_logit_scale_is_clamped_after_update(devices):
    # Initialised above the cap (log(1/0.07) > log(10)): one small step cannot bring it under by itself.
    c = tiny_config(**{"model.max_logit_scale": 10.0})
    state, hist = run_steps(c, [make_batch(c, 0)], devices)
    assert hist[0]["train/scale"] == pytest.approx(1 / 0.07, rel=1e-5)  # the step saw the initial scale
    assert float(state.params["logit_scale"]) == pytest.approx(math.log(10.0), abs=1e-6)


@pytest.mark.slow
def test_sigmoid_loss_over_the_ring_with_map_pooling(devices):
    """The real step with SigLIP's loss through the ring and attention pooling equals the dense loss."""
    common = {"loss.kind": "sigmoid", "model.image.pool": "map", "model.image.class_token": False,
              "optim.warmup_steps": 0}
    c = tiny_config(**common, **{"loss.impl": "ring"})
    batches = [make_batch(c, 0)] * 3
    ring = run_steps(c, batches, devices)[1]
    dense = run_steps(tiny_config(**common, **{"loss.impl": "dense"}), batches, devices)[1]
    for r, d in zip(ring, dense):
        assert bool(r["train/finite"]) and r["train/loss"] == pytest.approx(d["train/loss"], rel=1e-4)
    # At bias -10 every positive pair costs about 10 nats: far above a softmax loss (log 16).
    assert ring[0]["train/loss"] > 8 and ring[2]["train/loss"] < ring[0]["train/loss"]


def _copied_state_buffers(hlo: str) -> list[str]:
    """Names of train-state arguments the compiled module copies before using them."""
    import re

    entry = hlo[hlo.index("\nENTRY"):]
    return re.findall(r"copy\(%(state_(?:params|opt_state)\S*?)\)", entry)


def test_compiled_step_never_copies_weights_or_moments(devices):
    c = validate(tiny_config(**{"mesh.data": 1}), 1)
    setup = make_setup(c, sharding.mesh_from_config(c.mesh, devices[:1]))
    assert _copied_state_buffers(compile_train_step(setup).as_text()) == []

    # Positive control: guarding the update with a select of new against old (the pattern the
    # step avoids) makes XLA copy the donated buffers, and the check sees it.
    def guarded(state, grads):
        ok = jnp.isfinite(optax.global_norm(grads))
        updates, opt = setup.tx.update(grads, state.opt_state, state.params)
        new = (optax.apply_updates(state.params, updates), opt)
        return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, (state.params, state.opt_state))

    hlo = jax.jit(guarded, donate_argnums=0).lower(setup.abstract_state, setup.abstract_state.params).compile()
    assert _copied_state_buffers(hlo.as_text())
