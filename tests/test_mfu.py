"""Model FLOPs (train/mfu) against a hand count; compiled FLOPs (train/hfu) follow remat."""

import pytest

from clipjax import hlo_flops
from clipjax import mfu as mfu_lib
from clipjax import sharding
from clipjax.config import base_config, validate
from clipjax.train_step import compile_train_step, make_setup
from helpers import tiny_config


def _hand_count_b32_forward_per_example() -> tuple[int, int]:
    """ViT-B/32 forward matmul FLOPs per example, written out matrix by matrix (image, text), every row."""
    # Image: 224 px in 32 px patches -> 7 x 7 = 49 patches + 1 class token = 50 tokens, width 768.
    patches, tokens, d, mlp, layers = 49, 50, 768, 3072, 12
    patch_embed = patches * 2 * (32 * 32 * 3) * d
    q = k = v = o = tokens * 2 * d * d
    fc1 = fc2 = tokens * 2 * d * mlp
    scores = 2 * tokens * tokens * d  # [50 x 64] @ [64 x 50] per head, 12 heads
    weighted_values = 2 * tokens * tokens * d
    image = patch_embed + layers * (q + k + v + o + fc1 + fc2 + scores + weighted_values) + 2 * d * 512
    # Text: 77 tokens, width 512, MLP 2048; the token embedding is a lookup (no FLOPs).
    t, d, mlp = 77, 512, 2048
    q = k = v = o = t * 2 * d * d
    fc1 = fc2 = t * 2 * d * mlp
    text = layers * (q + k + v + o + fc1 + fc2 + 2 * (2 * t * t * d)) + 2 * d * 512
    return image, text


def test_b32_model_flops_equal_a_hand_count():
    c = base_config()
    c.model.size = "B/32"
    c.data.source = "synthetic"
    c.data.tokenizer = "clip"
    validate(c)
    image, text = _hand_count_b32_forward_per_example()
    # OpenCLIP's published profile for ViT-B-32 lists 4.41 G multiply-adds for the image tower.
    assert image / 2 / 1e9 == pytest.approx(4.41, abs=0.005)
    # Both towers pool one token, so the last block computes only that row: of its
    # T rows it skips T-1 queries, output projections, MLPs, and their scores and
    # weighted values; keys and values still cover all T tokens.
    for t, d, mlp in ((50, 768, 3072), (77, 512, 2048)):
        skipped = (t - 1) * (2 * d * d + 2 * d * d + 2 * d * mlp + 2 * d * mlp + 2 * t * d + 2 * t * d)
        if d == 768:
            image -= skipped
        else:
            text -= skipped
    batch = 256
    loss = 2 * batch * batch * 512  # the similarity matrix, forward
    expected = 3 * (batch * (image + text) + loss)  # backward = 2 x forward
    assert mfu_lib.clip_train_flops(c.model, batch) == expected


def _b32_flops_before_and_after(field: str, value) -> tuple[float, float]:
    """Model FLOPs of B/32 at batch 8, then with ``model.image.<field> = value``."""
    c = base_config()
    c.model.size = "B/32"
    validate(c)
    before = mfu_lib.clip_train_flops(c.model, 8)
    with c.unlocked():
        c.model.image[field] = value
    return before, mfu_lib.clip_train_flops(c.model, 8)


@pytest.mark.parametrize("pool", ["map", "gap"])
def test_pooling_every_token_computes_every_row_of_the_last_block(pool):
    tok, other = _b32_flops_before_and_after("pool", pool)
    d, t, mlp = 768, 50, 3072
    # The probe (map) or the mean (gap) reads every token, so the last block computes the T-1 rows "tok" skips.
    rows = (t - 1) * (2 * (2 * d * d + 2 * d * mlp) + 4 * t * d)
    head = 2 * d * d + 2 * (2 * t * d * d) + 2 * (2 * t * d) + 2 * d * d + 2 * (2 * d * mlp) if pool == "map" else 0
    assert other - tok == 3 * 8 * (head + rows)


def test_flip_masking_counts_the_kept_patches_only():
    full, masked = _b32_flops_before_and_after("mask_ratio", 0.5)
    # 49 patches at 0.5 keep int(24.5) = 24, + the class token: the blocks see 25 tokens, not 50;
    # every patch is still embedded. Per layer: 4 projections + 2 MLP matmuls per token, and the
    # T x T scores and weighted values. The last block computes the class token's row only: its
    # keys and values for the T tokens, one query, output projection, MLP and row of scores.
    d, mlp, layers = 768, 3072, 12
    per_layer = lambda t: t * 2 * (4 * d * d + 2 * d * mlp) + 2 * (2 * t * t * d)
    last = lambda t: t * 2 * (2 * d * d) + 2 * (2 * d * d + 2 * d * mlp) + 2 * (2 * t * d)
    blocks = lambda t: (layers - 1) * per_layer(t) + last(t)
    assert full - masked == 3 * 8 * (blocks(50) - blocks(25))


def _flops(remat, devices):
    c = validate(tiny_config(batch=8, **{"model.remat": remat, "model.scan": True, "mesh.data": 1}), 1)
    setup = make_setup(c, sharding.mesh_from_config(c.mesh, devices[:1]))
    return c.model, mfu_lib.clip_train_flops(c.model, 8), hlo_flops.compiled_flops(compile_train_step(setup))


@pytest.mark.slow
def test_model_flops_ignore_remat_while_compiled_flops_grow(devices):
    m, model_none, hw_none = _flops("none", devices)
    _, model_full, hw_full = _flops("full", devices)
    assert model_full == model_none  # train/mfu does not change with the remat policy
    # Full remat recomputes each block's forward in the backward pass: at least the matmuls whose outputs
    # the backward reads (q, k, v, scores, weighted values, first MLP layer; the attention output and
    # second MLP projections are not needed again), plus element-wise work.
    img, txt = m.image, m.text
    image_tokens = (img.image_size // img.patch_size) ** 2 + int(img.get("class_token", True))

    def recomputed(t, d, depth, mlp):
        # The last block computes one row (the pooled token), but its keys and values cover all T.
        last = 2 * d * d + 2 * (2 * t * d * d) + 4 * t * d + 2 * d * mlp
        return (depth - 1) * t * (2 * (3 * d * d + d * mlp) + 4 * t * d) + last

    blocks_forward = 8 * (recomputed(image_tokens, img.width, img.depth, img.mlp_dim)
                          + recomputed(txt.context_length, txt.width, txt.depth, txt.mlp_dim))
    assert hw_full - hw_none > blocks_forward, (hw_full, hw_none, blocks_forward)


@pytest.mark.parametrize("kind,dtype,expected", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H100 80GB HBM3", "float32", 495e12),  # TF32 tensor cores
    ("NVIDIA A100-SXM4-40GB", "float32", 156e12),
    ("TPU v5p", "float32", 459e12),  # one bf16 pass at default precision
    ("TPU v5 lite", "bfloat16", 197e12),
])
def test_peak_depends_on_dtype(kind, dtype, expected):
    assert mfu_lib.lookup_peak(kind, dtype)[0] == expected


def test_device_names_are_the_product_names_with_the_same_peak():
    import jax

    from clipjax import mfu as mfu_lib
    from clipjax.bench import table

    assert mfu_lib.device_name("TPU v5") == "TPU v5p" and mfu_lib.device_name("TPU v5 lite") == "TPU v5e"
    assert mfu_lib.device_name("NVIDIA H100 80GB HBM3") == "NVIDIA H100 80GB HBM3"
    for kind, name in mfu_lib.PRODUCT_NAMES.items():
        assert mfu_lib.peak_for_kind(name) == mfu_lib.peak_for_kind(kind)
    assert table.environment()["device_kind"] == mfu_lib.device_name(jax.devices()[0].device_kind)
