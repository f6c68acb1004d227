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
from clipjax.models.layers import Transformer


def model_cfg(size="tiny", **overrides):
    m = _model_config()
    with m.unlocked():
        m.size = size
        _fill(m, get_size(size))
        m.init_logit_scale = math.log(1 / 0.07)
        m.text.vocab_size = 49408
        m.dtype = "float32"
        m.update_from_flattened_dict(overrides)
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


# The stack is tested where remat and scan live: three blocks (so their order shows) and a
# padding mask (broadcast through scan and remat).
_DEPTH = 3


def _stack(scan, remat, dtype=jnp.float32):
    return Transformer(_DEPTH, num_heads=4, head_dim=8, mlp_dim=64, remat=remat, scan=scan, dtype=dtype)


def _unrolled(params):
    """Scanned params (leading "layers" axis) as the unrolled stack's block_0 ... block_{depth-1}."""
    return {f"block_{i}": jax.tree.map(lambda a: a[i], params["blocks"]) for i in range(_DEPTH)}


def _scanned(params):
    return {"blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"block_{i}"] for i in range(_DEPTH)])}


def _outputs_and_grads(module, params, x_BTD, w_BTD, mask_BT):
    def loss(p, x):
        y = module.apply({"params": p}, x, mask_BT)
        return jnp.sum(y * w_BTD), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x_BTD)
    return jax.tree.map(lambda a: np.asarray(a, np.float64), (y, grads))


@pytest.fixture(scope="module")
def stack_reference():
    """Float32 params and inputs, and the stack's outputs and gradients in float64 (scanned, no remat)."""
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(2, 2, 8, 32))
    mask = np.ones((2, 8), bool)
    mask[1, 5:] = False
    params = nn.unbox(jax.jit(_stack(True, "none").init)(jax.random.key(0), jnp.asarray(x, jnp.float32), mask))["params"]
    with jax.enable_x64(True):
        ref = _outputs_and_grads(_stack(True, "none", jnp.float64),
                                 jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params), jnp.asarray(x), w, mask)
    return params, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), mask, ref


@pytest.mark.parametrize("scan,remat", [(True, "none"), (True, "full"), (True, "dots"), (True, "dots_no_batch"),
                                        (False, "none"), (False, "dots_no_batch")])
def test_remat_and_scan_match_a_float64_reference(stack_reference, scan, remat):
    """Every remat policy, scanned or unrolled with the same weights, gives the float64 outputs and gradients.

    Remat recomputes each block's forward inside the backward pass, where XLA fuses and orders
    the float32 sums differently from the saved forward, so remat and no remat differ by float32
    rounding (a 1.3e-5 move on a CLIP gradient of 0.2 when the largest gradient was 117).
    Against float64 both are within 4e-7 of the largest value; a block skipped, reordered or
    recomputed from the wrong input moves them by more than 1e-2.
    """
    params, x, w, mask, (y64, grads64) = stack_reference
    y, (g_params, g_x) = _outputs_and_grads(_stack(scan, remat), params if scan else _unrolled(params), x, w, mask)
    grads = (g_params if scan else _scanned(g_params), g_x)
    tol = 3e-6
    np.testing.assert_allclose(y, y64, rtol=0, atol=tol * np.max(np.abs(y64)))
    g_max = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads64))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=tol * g_max), grads, grads64)


@pytest.mark.parametrize("scan,remat,causal", [(True, "none", False), (True, "dots_no_batch", True),
                                               (False, "none", True), (False, "dots_no_batch", False)])
def test_one_pooled_row_equals_that_row_of_the_full_stack(scan, remat, causal):
    """``query_B``: the last block computes one row per example; it is the full stack's row, gradients too.

    The reference runs every row of every block in float64 and reads the rows afterwards. The
    queried rows differ per example (one in the padded tail); a causal query sees the keys
    before it, a padded sequence only its valid keys.
    """
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=(2, 2, 8, 32))
    mask = None if causal else np.arange(8)[None, :] < np.array([[8], [5]])
    query = np.array([6, 3], np.int32)
    full = lambda dtype: Transformer(_DEPTH, num_heads=4, head_dim=8, mlp_dim=64, causal=causal, scan=True,
                                     dtype=dtype)
    params = nn.unbox(jax.jit(full(jnp.float32).init)(jax.random.key(0), jnp.asarray(x, jnp.float32), mask))["params"]
    pick = lambda a: jnp.take_along_axis(a, jnp.asarray(query)[:, None, None], axis=1)

    def outputs_and_grads(apply, p, x, w):
        def loss(p, x):
            y = apply(p, x)
            return jnp.sum(y * pick(w)), y
        (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(p, x)
        return jax.tree.map(lambda a: np.asarray(a, np.float64), (y, grads))

    with jax.enable_x64(True):
        y64, grads64 = outputs_and_grads(lambda p, x: pick(full(jnp.float64).apply({"params": p}, x, mask)),
                                         jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params),
                                         jnp.asarray(x), jnp.asarray(w))
    module = Transformer(_DEPTH, num_heads=4, head_dim=8, mlp_dim=64, causal=causal, remat=remat, scan=scan)
    y, (g_params, g_x) = outputs_and_grads(lambda p, x: module.apply({"params": p}, x, mask, query_B=jnp.asarray(query)),
                                           params if scan else _unrolled(params), jnp.asarray(x, jnp.float32),
                                           jnp.asarray(w, jnp.float32))
    assert y.shape == (2, 1, 32)
    tol = 3e-6
    np.testing.assert_allclose(y, y64, rtol=0, atol=tol * np.max(np.abs(y64)))
    grads = (g_params if scan else _scanned(g_params), g_x)
    g_max = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads64))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=tol * g_max), grads, grads64)


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
