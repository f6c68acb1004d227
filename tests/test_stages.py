"""Position-table resampling, resolution/text-length stages, and masking end to end."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from clipjax import checkpoint as ckpt_lib
from clipjax import sharding
from clipjax.config import load_config, validate
from clipjax.report import read_metrics
from clipjax.models import build_model, dummy_inputs, posemb
from clipjax.models import towers
from clipjax.train import _default_data_iterator, train
from clipjax.train_step import init_state, make_setup
from helpers import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.py")


def tiny_model(image_size=16, context_length=8, **kw):
    c = validate(tiny_config(**{"model.image.image_size": image_size, "model.image.patch_size": 4,
                                "model.text.context_length": context_length, **kw}))
    return c, build_model(c.model)


def init_params(c, model, seed=0):
    images, ids = dummy_inputs(c.model, 2)
    return nn.unbox(model.init(jax.random.key(seed), images, ids))["params"]


def inputs(image_size, context_length, seed=1):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(2, image_size, image_size, 3)).astype(np.float32)
    ids = rng.integers(3, 250, size=(2, context_length)).astype(np.int32)
    return images, ids


# --------------------------------------------------------------------------- resampling


def test_identity_resample_is_exact_and_outputs_unchanged():
    c, model = tiny_model()
    params = init_params(c, model)
    pos = params["image"]["pos_embedding"]
    assert posemb.resample_image_pos(pos, (4, 4), class_token=True) is pos
    assert posemb.resample_text_pos(params["text"]["pos_embedding"], 8) is params["text"]["pos_embedding"]
    same = posemb.resize_params(params, params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), same, params)
    images, ids = inputs(16, 8)
    before = model.apply({"params": params}, images, ids)
    after = model.apply({"params": same}, images, ids)
    for a, b in zip(before[:2], after[:2]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resampled_tables_interpolate_smooth_positions():
    # A table linear in the patch coordinates stays linear where every bicubic tap is inside the grid.
    r, s = np.meshgrid(np.arange(4.0), np.arange(4.0), indexing="ij")
    table = np.stack([r.ravel(), s.ravel(), (2 * r - s).ravel()], axis=1).astype(np.float32)
    cls = np.full((1, 3), 7.0, np.float32)
    out = np.asarray(posemb.resample_image_pos(jnp.asarray(np.concatenate([cls, table])), (8, 8), True))
    np.testing.assert_array_equal(out[0], cls[0])  # the class row is kept as it is
    grid = out[1:].reshape(8, 8, 3)
    centres = (np.arange(8) + 0.5) / 2 - 0.5  # where output pixel centres fall on the input grid
    inner = slice(3, 5)
    np.testing.assert_allclose(grid[inner, inner, 0], np.broadcast_to(centres[inner, None], (2, 2)), atol=1e-5)
    np.testing.assert_allclose(grid[inner, inner, 1], np.broadcast_to(centres[None, inner], (2, 2)), atol=1e-5)
    text = np.arange(8.0, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    np.testing.assert_array_equal(posemb.resample_text_pos(jnp.asarray(text), 5), text[:5])
    longer = np.asarray(posemb.resample_text_pos(jnp.asarray(text), 16))
    np.testing.assert_allclose(longer[1:-1, 0], ((np.arange(16) + 0.5) / 2 - 0.5)[1:-1], atol=1e-5)


def test_resampled_model_runs_at_another_size_like_on_the_fly_resampling():
    c16, model16 = tiny_model(16)
    c32, model32 = tiny_model(32)
    params16 = init_params(c16, model16)
    shapes32 = jax.eval_shape(lambda: init_params(c32, model32))
    params32 = posemb.resize_params(params16, shapes32)
    assert params32["image"]["pos_embedding"].shape == (1 + 8 * 8, 32)
    images, ids = inputs(32, 8)
    z32 = model32.apply({"params": params32}, images, ids)
    assert np.all(np.isfinite(np.asarray(z32[0])))
    # The 16 px model given 32 px images resamples its table the same way inside the forward.
    z_fly = model16.apply({"params": params16}, images, ids)
    np.testing.assert_allclose(np.asarray(z_fly[0]), np.asarray(z32[0]), atol=1e-6)
    # ... and the positions matter: without them the embedding is another one.
    no_pos = jax.tree.map(lambda x: x, params32)
    no_pos["image"]["pos_embedding"] = jnp.zeros_like(params32["image"]["pos_embedding"])
    assert np.max(np.abs(np.asarray(model32.apply({"params": no_pos}, images, ids)[0] - z32[0]))) > 1e-3


def test_init_from_a_checkpoint_at_another_image_size_and_context(devices, tmp_path):
    c16 = validate(tiny_config(**{"model.image.image_size": 16, "model.image.patch_size": 4}), 8)
    mesh = sharding.mesh_from_config(c16.mesh, devices)
    state16 = init_state(make_setup(c16, mesh), 0)
    saver = ckpt_lib.Checkpointer(str(tmp_path), every=1, keep=1, async_save=False)
    saver.save(1, state16)
    saver.close()
    c32 = validate(tiny_config(**{"model.image.image_size": 32, "model.image.patch_size": 4,
                                  "model.text.context_length": 12}), 8)
    setup32 = make_setup(c32, mesh)
    got = ckpt_lib.load_params(str(tmp_path), setup32.abstract_state.params)
    saved = jax.device_get(state16.params)
    want = posemb.resize_params(saved, setup32.abstract_state.params)
    for tower, rows in (("image", 1 + 8 * 8), ("text", 12)):
        assert got[tower]["pos_embedding"].shape == (rows, 32)
        assert got[tower]["pos_embedding"].sharding == setup32.abstract_state.params[tower]["pos_embedding"].sharding
        np.testing.assert_allclose(np.asarray(got[tower]["pos_embedding"]), np.asarray(want[tower]["pos_embedding"]),
                                   atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got["image"]["pos_embedding"])[0], saved["image"]["pos_embedding"][0])
    np.testing.assert_array_equal(np.asarray(got["image"]["patch_kernel"]), saved["image"]["patch_kernel"])


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def smoke(data_dir, *overrides):
    return load_config(f"{DEMO}:smoke,data={data_dir}", ["--config.evals.synthetic_zeroshot.every=0", *overrides])


class Crash(Exception):
    """A simulated crash of the training process."""


class ShapeRecorder:
    """The real pipeline, recording the text length and buffer side of each batch; crashes on request."""

    shapes: list = []
    crash_at: int | None = None  # the batch (counted over all instances) that raises Crash

    def __init__(self, config, mesh):
        self.inner = _default_data_iterator(config, mesh)

    def __next__(self):
        if len(ShapeRecorder.shapes) + 1 == ShapeRecorder.crash_at:
            raise Crash()
        batch = next(self.inner)
        ShapeRecorder.shapes.append((batch["text"].shape[1], batch["image"].shape[1]))
        return batch

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.slow
def test_resume_across_a_stage_boundary_with_masking_is_bitwise_exact(data_dir, tmp_path):
    # Steps 0-2 at 16 px and 24 tokens, 3-4 at the model's 32 px and 48 tokens, all with half the
    # patches masked, step 5 unmasked; the interrupted run crashes right after the stage boundary.
    c = smoke(data_dir, "--config.train.steps=6", "--config.checkpoint.every=3", "--config.checkpoint.async_save=false",
              "--config.model.image.mask_ratio=0.5", "--config.train.stages=((3, 16, 24),)",
              "--config.train.unmasked_steps=1")
    ref_dir, dir_a = str(tmp_path / "ref"), str(tmp_path / "a")
    ShapeRecorder.shapes, ShapeRecorder.crash_at = [], None
    ref_state = train(c, ref_dir, data_iterator_fn=ShapeRecorder)
    ref_shapes = ShapeRecorder.shapes
    assert [t for t, _ in ref_shapes] == [24, 24, 24, 48, 48, 48]
    assert ref_shapes[0][1] < ref_shapes[3][1]  # the host ships smaller crops in the low-resolution stage
    ShapeRecorder.shapes, ShapeRecorder.crash_at = [], 5  # after step 3's checkpoint and one step past it
    with pytest.raises(Crash):
        train(c, dir_a, data_iterator_fn=ShapeRecorder)
    ShapeRecorder.crash_at = None
    state = train(c, dir_a, data_iterator_fn=ShapeRecorder)
    assert ShapeRecorder.shapes == ref_shapes[:4] + ref_shapes[3:]  # resumed in the full-size stage

    def losses(d):
        return {r["step"]: r["train/loss"] for r in read_metrics(os.path.join(d, "metrics.jsonl")) if "train/loss" in r}

    assert losses(dir_a) == losses(ref_dir) and sorted(losses(ref_dir)) == [1, 2, 3, 4, 5, 6]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(ref_state.params))


def test_masking_is_off_in_eval_paths(data_dir, monkeypatch, devices):
    from clipjax.evals.evaluator import Evaluator
    from clipjax.train_step import compile_train_step

    calls, gather = [], towers.gather_patches

    def spy(x_BPD, keep_BK):
        calls.append(keep_BK.shape)
        return gather(x_BPD, keep_BK)

    monkeypatch.setattr(towers, "gather_patches", spy)
    c = smoke(data_dir, "--config.model.image.mask_ratio=0.75")
    validate(c, 8)
    setup = make_setup(c, sharding.mesh_from_config(c.mesh, devices))
    state = init_state(setup, 0)
    metrics = Evaluator(c, setup).run(state.params)[0]
    assert metrics and calls == []  # zero-shot and retrieval embedded every patch
    # Positive control: the train step of the same config gathers 4 of the 16 patches.
    compile_train_step(setup)
    assert calls and calls[0] == (c.train.batch_size, 4)
