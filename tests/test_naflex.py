"""NaFlex: the budget grid, host patches, the per-image position grid, padding invariance, mixed
aspect ratios, FLIP on padded examples, sharded equals unsharded, and a resume across a NaFlex stage."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from clipjax import mfu
from clipjax.config import validate
from clipjax.data import naflex as host
from clipjax.data import resize
from clipjax.models import CLIP, build_model, dummy_inputs
from clipjax.models import naflex
from clipjax.report import read_metrics
from clipjax import sharding
from clipjax.stages import final_phase, phases
from clipjax.train import _default_data_iterator, train
from clipjax.train_step import init_state, loss_and_grads, make_setup, mask_rng, patch_keep
from flax import linen as nn
from helpers import smoke as demo_smoke
from helpers import tiny_config


def smoke(data_dir, *overrides):
    return demo_smoke(data_dir, "--config.evals.synthetic_zeroshot.every=0", *overrides)


class Crash(Exception):
    """A simulated crash of the training process."""


SIZES = [(h, w) for h in (1, 7, 16, 33, 100, 240, 333, 480, 1000, 4000) for w in (1, 9, 16, 50, 224, 640, 999, 3000)]


# --------------------------------------------------------------------------- host


@pytest.mark.parametrize("budget", [1, 7, 64, 128, 256, 576, 1024])
def test_budget_grid_fits_keeps_aspect_and_is_the_largest(budget):
    for h, w in SIZES:
        rows, cols = host.budget_grid(h / 16, w / 16, budget)
        assert rows * cols <= budget, (h, w)
        # Aspect within one patch: some scale s puts both sides within a patch of s * (H, W) / p.
        lo = max((rows - 1) * 16 / h, (cols - 1) * 16 / w)
        hi = min(rows * 16 / h, cols * 16 / w)
        assert lo < hi + 1e-12, (h, w, rows, cols)
        # The largest such grid: one more row (or column) at the next scale no longer fits.
        for r, c in ((rows + 1, max(1, -(-(rows + 1) * w // h))), (max(1, -(-(cols + 1) * h // w)), cols + 1)):
            assert r * c > budget, (h, w, rows, cols, r, c)


def test_budget_grid_matches_transformers_bisection():
    from openclip_ref import transformers

    transformers()
    from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches as theirs

    for budget in (64, 256, 1024):
        for h, w in SIZES:
            rows, cols = host.budget_grid(h / 16, w / 16, budget)
            if max(rows * 16 / h, cols * 16 / w) > 90:
                continue  # transformers caps the scale at 100: tiny images get smaller grids there
            th, tw = theirs(h, w, 16, budget)
            assert (rows, cols) == (th // 16, tw // 16), (h, w, budget)


def test_patches_are_row_major_padded_and_deterministic():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    out = host.patchify(img, 8, 20)
    assert out["patches"].shape == (20, 192) and out["patch_valid"].sum() == 15
    np.testing.assert_array_equal(out["patches"][7].reshape(8, 8, 3), img[8:16, 16:24])  # row 1, col 2
    np.testing.assert_array_equal(out["patch_yx"][7], [1, 2])
    assert not out["patches"][15:].any() and not out["patch_yx"][15:].any()
    opts = host.NaflexOptions(seq_len=20, patch_size=8, crop_scale=(0.5, 1.0))
    a = host.train_patches(img, np.random.default_rng(3), opts)
    b = host.train_patches(img, np.random.default_rng(3), opts)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    whole = host.eval_patches(img, opts)  # 24x40 -> 3x5 patches of 8 at scale 1: the pixels as they are
    np.testing.assert_array_equal(whole["patches"], out["patches"])


# --------------------------------------------------------------------------- model


def _torch_resize(grid_GGD, h, w):
    t = torch.from_numpy(np.asarray(grid_GGD, np.float32)).permute(2, 0, 1)[None]
    out = torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return out[0].permute(1, 2, 0).numpy()


def _pil_resize(grid_GGD, h, w):
    chans = [np.asarray(Image.fromarray(np.asarray(grid_GGD[..., k], np.float32), mode="F").resize(
        (w, h), Image.Resampling.BILINEAR)) for k in range(grid_GGD.shape[-1])]
    return np.stack(chans, axis=-1)


def _row_major(shapes, length):
    yx = np.zeros((len(shapes), length, 2), np.int32)
    valid = np.zeros((len(shapes), length), bool)
    for b, (h, w) in enumerate(shapes):
        yx[b, :h * w] = np.stack(np.divmod(np.arange(h * w), w), axis=1)
        valid[b, :h * w] = True
    return yx, valid


def test_position_grid_resize_equals_pil_and_torch_antialiased_bilinear():
    grid = np.random.default_rng(0).normal(size=(8, 8, 5)).astype(np.float32)
    shapes = [(8, 8), (4, 16), (3, 21), (13, 5), (1, 1), (2, 30)]  # identity, down, up, both, extremes
    yx, valid = _row_major(shapes, 70)
    got = np.asarray(naflex.patch_positions(jnp.asarray(grid), jnp.asarray(yx), naflex.grid_hw(yx, valid)))
    for b, (h, w) in enumerate(shapes):
        for ref in (_torch_resize(grid, h, w), _pil_resize(grid, h, w)):
            np.testing.assert_allclose(got[b, :h * w], ref.reshape(h * w, -1), atol=2e-6, err_msg=str((h, w)))
    np.testing.assert_array_equal(got[0, :64], grid.reshape(64, -1))  # the model's own grid is exact


def _naflex_config(**kw):
    return validate(tiny_config(**{"model.image.image_size": 16, "model.image.patch_size": 4,
                                   "model.image.seq_len": 12, "model.image.pool": "map",
                                   "model.image.class_token": False, "model.image.ln_pre": False,
                                   "model.image.patch_bias": True, "loss.kind": "sigmoid", **kw}))


def _naflex_images(shapes, length, seed=0):
    rng = np.random.default_rng(seed)
    rows = [host.patchify(rng.integers(0, 256, (h * 4, w * 4, 3), dtype=np.uint8), 4, length) for h, w in shapes]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@pytest.fixture(scope="module")
def tower():
    c = _naflex_config(**{"model.image.class_token": True, "model.image.pool": "map"})
    model = build_model(c.model)
    params = jax.jit(model.init)(jax.random.key(0), *dummy_inputs(c.model))["params"]
    encode = jax.jit(lambda p, x, keep=None: model.apply({"params": p}, resize.model_images(x, 16), keep,
                                                          method=CLIP.encode_image))
    return params, encode


SHAPES = [(3, 4), (1, 9), (5, 2), (2, 2)]  # mixed aspect ratios, each up to 12 patches


def test_padding_invariance_and_mixed_aspect_ratios_in_one_batch(tower):
    params, encode = tower
    batch = encode(params, _naflex_images(SHAPES, 12))
    longer = encode(params, _naflex_images(SHAPES, 40))  # the same images padded to a longer budget
    np.testing.assert_allclose(np.asarray(longer), np.asarray(batch), atol=2e-6)
    for b in range(len(SHAPES)):  # each image alone
        alone = encode(params, {k: v[b:b + 1] for k, v in _naflex_images(SHAPES, 40).items()})
        np.testing.assert_allclose(np.asarray(alone)[0], np.asarray(batch)[b], atol=2e-6)
    assert np.max(np.abs(np.asarray(batch)[0] - np.asarray(batch)[1])) > 1e-3  # the rows are not all alike


def test_flip_kept_padding_stays_masked(tower):
    """FLIP's kept slots beyond an image's kept patches are padding: the embedding is the same whatever
    padding fills them, and differs once another image patch is kept."""
    params, encode = tower
    small = lambda length: {k: v[3:4] for k, v in _naflex_images(SHAPES, length).items()}  # 2x2: 4 patches
    short = encode(params, small(12), jnp.asarray([[0, 3, 5, 7, 9, 11]], jnp.int32))
    padded = small(40)
    padded["patch_yx"][0, 4:] = (1, 1)  # padding whose position, were it attended to, would show
    long = encode(params, padded, jnp.asarray([[0, 3, *range(4, 22)]], jnp.int32))
    np.testing.assert_allclose(np.asarray(long), np.asarray(short), atol=2e-6)
    other = encode(params, small(12), jnp.asarray([[0, 2, 5, 7, 9, 11]], jnp.int32))
    assert np.max(np.abs(np.asarray(other) - np.asarray(short))) > 1e-3


def test_flip_keeps_only_image_patches():
    valid = np.zeros((64, 20), bool)
    n_valid = np.random.default_rng(0).integers(1, 21, size=64)
    for b, n in enumerate(n_valid):
        valid[b, :n] = True
    keep = np.asarray(naflex.random_keep_valid(jax.random.key(1), jnp.asarray(valid), 0.5))
    assert keep.shape == (64, 10)
    kept_valid = np.take_along_axis(valid, keep, axis=1)
    np.testing.assert_array_equal(kept_valid.sum(1), np.maximum(1, np.floor(n_valid * 0.5)))
    assert all(len(set(row)) == 10 for row in keep.tolist())
    assert len({tuple(r) for r, n in zip(keep.tolist(), n_valid) if n == 20}) > 1  # random per example


# --------------------------------------------------------------------------- training


def test_model_flops_count_naflex_tokens_and_the_grid_resize():
    """NaFlex at L patches costs the fixed path's FLOPs at L patches plus the [L, G*G] @ [G*G, D] resize."""
    kw = dict(patch_size=16, width=768, depth=12, mlp_dim=3072, embed_dim=768, class_token=False, pool="map")
    fixed_256 = mfu.vit_flops(256, **kw)
    assert mfu.vit_flops(224, **kw, seq_len=256) == fixed_256 + 2 * 256 * 14 * 14 * 768
    assert mfu.vit_flops(256, **kw, seq_len=1024) == mfu.vit_flops(512, **kw) + 2 * 1024 * 16 * 16 * 768


def _step_batches(c, n):
    rng = np.random.default_rng(1)
    out = []
    for s in range(n):
        shapes = [((1, 12), (3, 4), (4, 3), (2, 5), (12, 1), (2, 2), (3, 3), (1, 7))[(s + i) % 8] for i in range(16)]
        ids = rng.integers(1, 258, size=(16, 8)).astype(np.int32)
        out.append({**_naflex_images(shapes, 12, seed=s), "text": ids})
    return out


def _masked_loss_and_grads(c, devices, batch):
    """What the train step differentiates, with its NaFlex FLIP masks, on a mesh of ``devices``."""
    setup = make_setup(c, sharding.mesh_from_config(c.mesh, devices))
    state = init_state(setup, 0)
    phase = final_phase(c)

    def fn(params, batch):
        keep = patch_keep(c, phase, batch, mask_rng(c.seed, state.step))
        return loss_and_grads(setup, params, batch, keep, phase)[::2]

    sh = setup.batch_shardings()
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        return jax.device_get(jax.jit(fn)(state.params, {k: jax.device_put(v, sh[k]) for k, v in batch.items()}))


def test_naflex_masked_gradients_on_eight_devices_equal_one_device(devices):
    opts = {"model.image.mask_ratio": 0.5, "loss.impl": "chunked"}
    batch = _step_batches(_naflex_config(), 1)[0]
    loss8, g8 = _masked_loss_and_grads(_naflex_config(**{"mesh.data": 4, "mesh.fsdp": 2, **opts}), devices, batch)
    loss1, g1 = _masked_loss_and_grads(_naflex_config(**{"mesh.data": 1, **opts}), devices[:1], batch)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g8, g1)
    assert float(np.abs(g1["image"]["patch_kernel"]).max()) > 0


class FieldRecorder:
    """The real pipeline, recording each batch's image fields; crashes on opening the ``crash_at``-th."""

    fields: list = []
    opened = 0
    crash_at: int | None = None

    def __init__(self, config, mesh):
        FieldRecorder.opened += 1
        if FieldRecorder.opened == FieldRecorder.crash_at:
            raise Crash()
        self.inner = _default_data_iterator(config, mesh)

    def __next__(self):
        batch = next(self.inner)
        FieldRecorder.fields.append(tuple(sorted((k, v.shape[1]) for k, v in resize.image_fields(batch).items())))
        return batch

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.slow
def test_resume_across_a_naflex_stage_boundary_is_bitwise_exact(tmp_path):
    # Steps 0-1 at the model's 32 px crops, 2-3 NaFlex at 12 patches (the final mode), half the patches
    # masked; the interrupted run crashes as it opens the NaFlex pipeline, and resumes from the last
    # fixed-resolution step's checkpoint straight into NaFlex, continuing the crops' example stream.
    data_dir = str(tmp_path / "data")
    c = smoke(data_dir, "--config.train.steps=4", "--config.checkpoint.every=2", "--config.checkpoint.async_save=false",
              "--config.model.image.mask_ratio=0.5", "--config.train.stages=((2, 32, 48),)",
              "--config.model.image.seq_len=12", "--config.data.synth.num_train=96")
    assert [p.seq_len for _, _, p in phases(validate(c))] == [0, 12]
    ref_dir, dir_a = str(tmp_path / "ref"), str(tmp_path / "a")
    FieldRecorder.fields, FieldRecorder.opened, FieldRecorder.crash_at = [], 0, None
    ref_state = train(c, ref_dir, data_iterator_fn=FieldRecorder)
    ref_fields = FieldRecorder.fields
    assert ref_fields[1][0][0] == "image" and dict(ref_fields[2])["patches"] == 12
    FieldRecorder.fields, FieldRecorder.opened, FieldRecorder.crash_at = [], 0, 2
    with pytest.raises(Crash):
        train(c, dir_a, data_iterator_fn=FieldRecorder)
    assert len(FieldRecorder.fields) == 2
    FieldRecorder.crash_at = None
    state = train(c, dir_a, data_iterator_fn=FieldRecorder)
    assert FieldRecorder.fields == ref_fields

    def losses(d):
        return {r["step"]: r["train/loss"] for r in read_metrics(os.path.join(d, "metrics.jsonl")) if "train/loss" in r}

    assert losses(dir_a) == losses(ref_dir) and sorted(losses(ref_dir)) == [1, 2, 3, 4]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(ref_state.params))


def test_a_checkpoint_evaluates_at_any_naflex_length():
    from clipjax import checkpoint as ckpt_lib

    saved = _naflex_config().to_json()
    ckpt_lib.check_compatible(saved, _naflex_config(**{"model.image.seq_len": 64}).to_json())
    ckpt_lib.check_compatible(saved, _naflex_config(**{"model.image.seq_len": 0}).to_json())
    with pytest.raises(ckpt_lib.IncompatibleCheckpoint, match="patch_size"):
        ckpt_lib.check_compatible(saved, _naflex_config(**{"model.image.patch_size": 8}).to_json())
