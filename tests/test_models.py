"""Model sizes, shapes, dtypes, normalisation, pooling and logical annotations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from clipjax import sharding
from clipjax.config import _fill, _model_config
from clipjax.models import build_model, count_params, dummy_inputs, get_size


def model_cfg(size="tiny", **overrides):
    m = _model_config()
    with m.unlocked():
        m.size = size
        _fill(m, get_size(size))
        m.init_logit_scale = math.log(1 / 0.07)
        m.text.vocab_size = 49408
        m.dtype = "float32"
        for key, value in overrides.items():
            node = m
            *path, last = key.split(".")
            for p in path:
                node = node[p]
            node[last] = value
    return m


def tiny(**overrides):
    base = {"image.image_size": 32, "image.patch_size": 8, "text.vocab_size": 300, "text.context_length": 16,
            "image.width": 64, "image.heads": 4, "image.mlp_dim": 128, "image.depth": 2,
            "text.width": 64, "text.heads": 4, "text.mlp_dim": 128, "text.depth": 2, "embed_dim": 32}
    base.update(overrides)
    return model_cfg("tiny", **base)


@pytest.mark.parametrize("size,expected", [
    ("S/32", 63_085_825),  # OpenCLIP ViT-S-32 (63.09 M in its model profile)
    ("S/16", 62_257_537),  # OpenCLIP ViT-S-16 (62.26 M)
    ("B/32", 151_277_313),  # OpenCLIP ViT-B-32
    ("B/16", 149_620_737),  # OpenCLIP ViT-B-16
    ("L/14", 427_616_513),  # OpenCLIP ViT-L-14
    ("H/14", 986_109_441),  # OpenCLIP ViT-H-14
    ("g/14", 1_366_678_273),  # OpenCLIP ViT-g-14 (image 1012.65 M + text 354.03 M)
])
def test_parameter_counts_match_openclip(size, expected):
    m = model_cfg(size)
    model = build_model(m)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(m)))
    assert count_params(abstract["params"]) == expected


def test_scan_and_unrolled_have_same_parameter_count():
    counts = []
    for scan in (True, False):
        m = tiny(scan=scan)
        model = build_model(m)
        counts.append(count_params(jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(m)))))
    assert counts[0] == counts[1]


def _init_apply(m, images, ids, seed=0):
    model = build_model(m)
    params = model.init(jax.random.key(seed), images, ids)
    return model, nn.unbox(params), model.apply(params, images, ids)


def _inputs(m, b=4, seed=0):
    rng = np.random.default_rng(seed)
    s = m.image.image_size
    images = jnp.asarray(rng.normal(size=(b, s, s, 3)), jnp.float32)
    lengths = rng.integers(3, m.text.context_length - 2, size=b)
    ids = np.zeros((b, m.text.context_length), np.int32)
    for i, n in enumerate(lengths):
        ids[i, 0] = m.text.vocab_size - 2  # start token
        ids[i, 1:n - 1] = rng.integers(1, m.text.vocab_size - 2, size=n - 2)
        ids[i, n - 1] = m.text.vocab_size - 1  # end token: the largest id
    return images, jnp.asarray(ids)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shapes_dtypes_and_normalisation(dtype):
    m = tiny(dtype=dtype)
    images, ids = _inputs(m)
    _, params, (zimg, ztxt, scale, bias) = _init_apply(m, images, ids)
    assert zimg.shape == (4, 32) and ztxt.shape == (4, 32)
    assert zimg.dtype == jnp.dtype(dtype) and ztxt.dtype == jnp.dtype(dtype)
    for leaf in jax.tree.leaves(params):
        assert leaf.dtype == jnp.float32  # params stay fp32 whatever the compute dtype
    tol = 1e-5 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(np.linalg.norm(np.asarray(zimg, np.float32), axis=-1), 1.0, atol=tol)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(ztxt, np.float32), axis=-1), 1.0, atol=tol)
    np.testing.assert_allclose(float(scale), 1 / 0.07, rtol=1e-5)
    assert bias is None


def test_scale_is_the_exp_of_its_parameter_and_bias_initialised():
    m = tiny(init_logit_scale=math.log(20.0), init_logit_bias=-10.0)
    images, ids = _inputs(m)
    _, params, (_, _, scale, bias) = _init_apply(m, images, ids)
    np.testing.assert_allclose(float(scale), 20.0, rtol=1e-6)
    np.testing.assert_allclose(float(bias), -10.0)
    assert float(params["params"]["logit_scale"]) == pytest.approx(math.log(20.0))


@pytest.mark.parametrize("pool,causal", [("eot", True), ("last", True), ("last", False)])
def test_padding_never_changes_text_embedding(pool, causal):
    m = tiny(**{"text.pool": pool, "text.causal": causal})
    images, ids = _inputs(m)
    model, params, (_, ztxt, _, _) = _init_apply(m, images, ids)
    # Same captions, padded to a shorter length: the pooled embedding must not move.
    longest = int(np.max(np.sum(np.asarray(ids) != 0, axis=1)))
    short = ids[:, :longest]
    ztxt_short = model.apply({"params": params["params"]}, short, method=model.encode_text)
    np.testing.assert_allclose(np.asarray(ztxt_short), np.asarray(ztxt), atol=1e-5)
    # Changing pad tokens' positions' contents is impossible (they are pad), but changing
    # a token *before* the pooled position must change it: the test can fail.
    changed = ids.at[:, 1].set(ids[:, 1] % (m.text.vocab_size - 3) + 1)
    z_changed = model.apply({"params": params["params"]}, changed, method=model.encode_text)
    assert np.max(np.abs(np.asarray(z_changed) - np.asarray(ztxt))) > 1e-4


@pytest.mark.parametrize("pool", ["tok", "gap", "map"])
def test_image_pools(pool):
    m = tiny(**{"image.pool": pool})
    images, ids = _inputs(m)
    _, _, (zimg, _, _, _) = _init_apply(m, images, ids)
    assert zimg.shape == (4, 32) and bool(jnp.all(jnp.isfinite(zimg)))


_REMAT_OPEN = pytest.mark.xfail(reason="gradients differ by more than float reordering explains; open (issue 15)",
                                strict=False)


@pytest.mark.parametrize("remat", ["none", pytest.param("full", marks=_REMAT_OPEN),
                                   pytest.param("dots", marks=_REMAT_OPEN)])
def test_remat_and_scan_do_not_change_outputs(remat):
    images, ids = _inputs(tiny())
    ref = _init_apply(tiny(scan=False), images, ids)[2][0]
    out = _init_apply(tiny(scan=True, remat=remat), images, ids)[2][0]
    # Scanned and unrolled stacks draw different init rngs, so compare each to itself
    # through gradients instead: remat must give the same loss and grads as no remat.
    model_a, model_b = build_model(tiny(remat="none")), build_model(tiny(remat=remat))
    params = model_a.init(jax.random.key(0), images, ids)

    def loss(model, p):
        zi, zt, s, _ = model.apply(p, images, ids)
        return jnp.sum(zi * zt) * s

    la, ga = jax.value_and_grad(lambda p: loss(model_a, p))(params)
    lb, gb = jax.value_and_grad(lambda p: loss(model_b, p))(params)
    np.testing.assert_allclose(float(la), float(lb), rtol=1e-6)
    # Recomputation reorders float32 sums: a few ulps, far below what a wrong recomputation moves.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                         atol=1e-6 * float(np.max(np.abs(a)))),
                 nn.unbox(ga), nn.unbox(gb))
    assert ref.shape == out.shape


def test_determinism_for_fixed_rng():
    m = tiny()
    images, ids = _inputs(m)
    _, p1, o1 = _init_apply(m, images, ids, seed=3)
    _, p2, o2 = _init_apply(m, images, ids, seed=3)
    _, p3, _ = _init_apply(m, images, ids, seed=4)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p1, p2)
    np.testing.assert_array_equal(np.asarray(o1[0]), np.asarray(o2[0]))
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), p1, p3)
    assert max(jax.tree.leaves(diff)) > 0


def test_quick_gelu_changes_outputs():
    images, ids = _inputs(tiny())
    a = _init_apply(tiny(act="gelu"), images, ids)[2][0]
    b = _init_apply(tiny(act="quick_gelu"), images, ids)[2][0]
    assert float(jnp.max(jnp.abs(a - b))) > 1e-6


def test_every_parameter_has_logical_axes_and_they_map_to_the_mesh(devices):
    m = tiny()
    model = build_model(m)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(m)))
    specs = nn.get_partition_spec(abstract)
    leaves = jax.tree.leaves(nn.unbox(abstract))
    boxed = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert len(boxed) == len(leaves)
    assert all(isinstance(b, nn.LogicallyPartitioned) for b in boxed)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = sharding.param_shardings(abstract, mesh, sharding.DEFAULT_RULES)
    fc = shardings["params"]["image"]["transformer"]["blocks"]["mlp"]["fc_kernel"]
    assert fc.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")  # layers, embed, mlp
    assert len(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))) == len(leaves)


def test_model_code_names_no_mesh_axes():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "clipjax" / "models"
    for path in root.glob("*.py"):
        text = path.read_text()
        for axis in sharding.MESH_AXES:
            assert f'"{axis}"' not in text and f"'{axis}'" not in text, f"{path.name} names mesh axis {axis}"


def test_eot_pooling_finds_a_small_end_token():
    """The bytes tokenizer's end token (2) is not its largest id: pool="eot" must still find it."""
    from clipjax.data.tokenizer import ByteTokenizer

    m = tiny(**{"text.pool": "eot", "text.eot_id": ByteTokenizer.eot_id, "text.vocab_size": ByteTokenizer.vocab_size})
    ids = jnp.asarray(ByteTokenizer(16)(["a red circle.", "two small blue squares"]), jnp.int32)
    images, _ = _inputs(m, b=2)
    model, params, (_, z_eot, _, _) = _init_apply(m, images, ids)
    last = model.apply({"params": params["params"]}, ids, method=model.encode_text)
    m_last = tiny(**{"text.pool": "last", "text.vocab_size": ByteTokenizer.vocab_size})
    z_last = build_model(m_last).apply({"params": params["params"]}, ids, method=model.encode_text)
    np.testing.assert_allclose(np.asarray(z_eot), np.asarray(last), atol=0)
    np.testing.assert_allclose(np.asarray(z_eot), np.asarray(z_last), atol=1e-6)  # end token = last non-pad
    m_argmax = tiny(**{"text.pool": "eot", "text.vocab_size": ByteTokenizer.vocab_size})
    z_argmax = build_model(m_argmax).apply({"params": params["params"]}, ids, method=model.encode_text)
    assert np.max(np.abs(np.asarray(z_argmax) - np.asarray(z_eot))) > 1e-4  # argmax picks a byte
