"""Contrastive losses: every impl equals a float64 numpy reference, on 1-8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from clipjax import losses, sharding

B, D = 64, 16


def embeddings(seed=0, batch=B, dim=D, noise=0.5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = x + noise * rng.normal(size=(batch, dim))
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return x.astype(np.float32), y.astype(np.float32)


def reference(x, y, scale, bias, kind):
    """Loss, gradients (x, y, scale, bias) and metrics in float64 numpy."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    n = len(x)
    sims = x @ y.T
    logits = scale * sims + bias
    eye = np.eye(n)
    if kind == "softmax":
        def log_softmax(a, axis):
            m = a.max(axis, keepdims=True)
            return a - m - np.log(np.exp(a - m).sum(axis, keepdims=True))

        lr, lc = log_softmax(logits, 1), log_softmax(logits, 0)
        loss = -(np.trace(lr) + np.trace(lc)) / (2 * n)
        g = (np.exp(lr) + np.exp(lc) - 2 * eye) / (2 * n)
    else:
        z = 2 * eye - 1
        loss = np.sum(np.logaddexp(0.0, -z * logits)) / n
        g = -z / (1 + np.exp(z * logits)) / n
    grads = (scale * g @ y, scale * g.T @ x, np.sum(g * sims), np.sum(g))
    metrics = {
        "i2t_acc": np.mean(np.argmax(logits, 1) == np.arange(n)),
        "t2i_acc": np.mean(np.argmax(logits, 0) == np.arange(n)),
        "pos_sim": np.mean(np.diag(sims)),
        "neg_sim": np.sum(sims * (1 - eye)) / (n * (n - 1)),
    }
    return loss, grads, metrics


def mesh_of(data, fsdp):
    return sharding.make_mesh({"data": data, "fsdp": fsdp, "tensor": 1}, devices=jax.devices()[: data * fsdp])


def run(x, y, scale, bias, kind, impl, mesh, chunk_size=None):
    sh = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
    use_bias = kind == "sigmoid"

    def f(x, y, s, b):
        return losses.contrastive_loss(x, y, s, b if use_bias else None, kind=kind, impl=impl, mesh=mesh,
                                       chunk_size=chunk_size)

    (loss, metrics), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(
        jax.device_put(x, sh), jax.device_put(y, sh), jnp.float32(scale), jnp.float32(bias))
    return float(loss), [np.asarray(g) for g in grads], jax.device_get(metrics)


def assert_close(got, want, rtol=1e-5):
    """|got - want| <= rtol * max|want| (relative to the array's scale)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
    assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


MESHES = [(1, 1), (2, 1), (2, 2), (4, 2)]
PARAMS = {"softmax": (20.0, 0.0), "sigmoid": (10.0, -3.0)}


@pytest.mark.parametrize("data,fsdp", MESHES, ids=[f"{d}x{f}" for d, f in MESHES])
@pytest.mark.parametrize("impl", losses.IMPLS)
@pytest.mark.parametrize("kind", losses.KINDS)
def test_matches_float64_reference(devices, kind, impl, data, fsdp):
    x, y = embeddings()
    scale, bias = PARAMS[kind]
    want_loss, want_grads, want_metrics = reference(x, y, scale, bias, kind)
    # chunk 4 forces several tiles per device (and several per ring step).
    loss, grads, metrics = run(x, y, scale, bias, kind, impl, mesh_of(data, fsdp), chunk_size=4)
    assert_close(loss, want_loss)
    names = ("zimg", "ztxt", "scale", "bias") if kind == "sigmoid" else ("zimg", "ztxt", "scale")
    for name, got, want in zip(names, grads, want_grads):
        assert_close(got, want), name
    for key, want in want_metrics.items():
        np.testing.assert_allclose(metrics[key], want, rtol=1e-5, atol=1e-6, err_msg=key)
    assert metrics["scale"] == pytest.approx(scale)
    assert ("bias" in metrics) == (kind == "sigmoid")
    assert 0.0 < want_metrics["i2t_acc"] < 1.0  # accuracy is informative on this data


@pytest.mark.parametrize("impl", ["chunked", "ring"])
def test_default_chunk_size_matches_reference(devices, impl):
    x, y = embeddings(seed=1)
    want_loss, want_grads, _ = reference(x, y, 30.0, 0.0, "softmax")
    loss, grads, _ = run(x, y, 30.0, 0.0, "softmax", impl, mesh_of(8, 1))
    assert_close(loss, want_loss)
    assert_close(grads[0], want_grads[0])


@pytest.mark.parametrize("kind", losses.KINDS)
def test_tensor_axis_replicates_the_loss(devices, kind):
    """A tensor-parallel axis in the mesh does not change loss or gradients."""
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    x, y = embeddings(seed=2)
    scale, bias = PARAMS[kind]
    want_loss, want_grads, _ = reference(x, y, scale, bias, kind)
    for impl in ("allgather", "ring"):
        loss, grads, _ = run(x, y, scale, bias, kind, impl, mesh, chunk_size=8)
        assert_close(loss, want_loss)
        assert_close(grads[1], want_grads[1])


@pytest.mark.parametrize("kind", losses.KINDS)
def test_bf16_at_max_scale_is_finite_and_close(devices, kind):
    x, y = embeddings(seed=3, noise=0.2)
    bias = -10.0 if kind == "sigmoid" else 0.0
    want_loss, _, _ = reference(x, y, 100.0, bias, kind)
    xb, yb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)
    want_bf16, _, _ = reference(np.asarray(xb, np.float32), np.asarray(yb, np.float32), 100.0, bias, kind)
    for impl in losses.IMPLS:
        loss, grads, _ = run(xb, yb, 100.0, bias, kind, impl, mesh_of(4, 2), chunk_size=8)
        assert np.isfinite(loss) and all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)
        assert grads[0].dtype == jnp.bfloat16
        # Rounding the inputs to bf16 is the only error: the loss itself is computed in fp32.
        assert loss == pytest.approx(want_bf16, rel=1e-4, abs=1e-5)
        assert loss == pytest.approx(want_loss, rel=0.05, abs=1e-3)


def test_ring_never_gathers_the_batch(devices):
    mesh = mesh_of(8, 1)
    sh = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
    x = jax.ShapeDtypeStruct((B, D), jnp.float32, sharding=sh)

    def hlo(impl):
        f = lambda x, y, s: losses.contrastive_loss(x, y, s, kind="softmax", impl=impl, mesh=mesh, chunk_size=4)[0]
        return jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(x, x, jax.ShapeDtypeStruct((), jnp.float32)).as_text()

    ring, chunked = hlo("ring"), hlo("chunked")
    assert "all_gather" not in ring and "collective_permute" in ring
    assert "all_gather" in chunked  # the check above can see a gather when there is one


def test_streaming_impls_use_less_memory_than_allgather(devices):
    """Compiled temporaries (not timings): chunked and ring stay far below the gathered logits."""
    mesh = mesh_of(8, 1)
    sh = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
    batch, dim = 4096, 32
    x = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=sh)

    def temp_bytes(impl):
        f = lambda x, y, s: losses.contrastive_loss(x, y, s, kind="softmax", impl=impl, mesh=mesh,
                                                    chunk_size=64)[0]
        compiled = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(x, x, jax.ShapeDtypeStruct((), jnp.float32)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = (batch // 8) * batch * 4  # one device's [b, B] fp32 logits
    allgather, chunked, ring = temp_bytes("allgather"), temp_bytes("chunked"), temp_bytes("ring")
    assert allgather >= logits_bytes
    assert chunked < allgather / 4
    assert ring < chunked


def test_errors_name_the_culprit(devices):
    x, y = embeddings()
    mesh = mesh_of(4, 2)
    with pytest.raises(ValueError, match="kind='cosine'"):
        losses.contrastive_loss(x, y, 1.0, kind="cosine", impl="dense")
    with pytest.raises(ValueError, match="impl='naive'"):
        losses.contrastive_loss(x, y, 1.0, kind="softmax", impl="naive", mesh=mesh)
    with pytest.raises(ValueError, match=r"zimg \(64, 16\) and ztxt \(64, 8\)"):
        losses.contrastive_loss(x, y[:, :8], 1.0, kind="softmax", impl="ring", mesh=mesh)
    with pytest.raises(ValueError, match="global batch 60 is not divisible by the 8"):
        losses.contrastive_loss(x[:60], y[:60], 1.0, kind="softmax", impl="ring", mesh=mesh)
    with pytest.raises(ValueError, match="chunk_size=3"):
        losses.contrastive_loss(x, y, 1.0, kind="softmax", impl="ring", mesh=mesh, chunk_size=3)
    with pytest.raises(ValueError, match="needs the mesh"):
        losses.contrastive_loss(x, y, 1.0, kind="softmax", impl="chunked")


def test_default_chunk_size_bounds_the_tile():
    assert losses.default_chunk_size(4096, 4096) * 4096 * 4 <= losses.TILE_BYTES
    assert losses.default_chunk_size(4096, 4096) == 256
    assert losses.default_chunk_size(8, 12) == 12
    assert losses.default_chunk_size(2**20, 6) == 1


@pytest.mark.parametrize("impl", losses.IMPLS)
def test_in_batch_accuracy_counts_identical_captions_as_right(devices, impl):
    """64 pairs over 12 distinct token sequences: every impl on a 4x2 mesh counts like a brute force."""
    rng = np.random.default_rng(3)
    captions_CL = rng.integers(1, 500, size=(12, 7))
    caption_B = rng.integers(0, 12, size=B)
    ids_BL = captions_CL[caption_B]
    base_CD = rng.normal(size=(12, D))
    x = base_CD[caption_B] + 0.6 * rng.normal(size=(B, D))
    y = base_CD[caption_B] + 0.3 * rng.normal(size=(B, D))
    x, y = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (x, y))
    logits = x @ y.T
    want_i2t = np.mean(caption_B[np.argmax(logits, 1)] == caption_B)
    want_t2i = np.mean(caption_B[np.argmax(logits, 0)] == caption_B)
    assert want_i2t > 0.8 > reference(x, y, 1.0, 0.0, "softmax")[2]["i2t_acc"]  # duplicates matter here

    mesh = mesh_of(4, 2)
    sh = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
    keys = losses.text_keys(jnp.asarray(ids_BL, jnp.int32))
    assert len(set(np.asarray(keys).tolist())) == 12
    f = lambda x, y, k: losses.contrastive_loss(x, y, 10.0, kind="softmax", impl=impl, mesh=mesh, chunk_size=4,
                                                text_key=k)
    (_, metrics), _ = jax.jit(jax.value_and_grad(f, has_aux=True))(
        jax.device_put(x.astype(np.float32), sh), jax.device_put(y.astype(np.float32), sh),
        jax.device_put(keys, NamedSharding(mesh, P(sharding.BATCH_AXES))))
    assert float(metrics["i2t_acc"]) == want_i2t
    assert float(metrics["t2i_acc"]) == want_t2i
