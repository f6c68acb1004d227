"""The LocCa decoder: masking, the chunked vocabulary loss, parallel prediction, coordinates,
sharding, exact resume, KV-cache decoding and exports without the decoder."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clipjax import locca, sharding, vocab_loss
from clipjax.config import validate
from clipjax.data.locca import DecoderTargets, dequantise, quantise, regions_in_crop
from clipjax.models import CLIP, build_model
from helpers import make_batch, read_back, run_steps, sample_images, tiny_config

MASK_ID = 99


def decoder_config(**overrides):
    c = tiny_config(**{"model.decoder.enabled": True, "model.decoder.width": 32, "model.decoder.heads": 2,
                       "model.decoder.mlp_dim": 64, "model.decoder.depth": 2, "loss.decoder.num_bins": 16,
                       "loss.decoder.vocab_chunk": 64, **overrides})
    return validate(c)


def decoder_batch(c, seed):
    """``make_batch`` plus targets as the pipeline writes them: each task, regions in some crops."""
    batch = make_batch(c, seed)
    rng = np.random.default_rng(seed)
    t = DecoderTargets.from_config(c)
    tokenize = lambda texts: np.asarray([[1, *(3 + np.arange(len(s)) % 200), 2] for s in texts])
    rows = [t.build(batch["text"][i], [{"box": [0.1, 0.2, 0.5, 0.9], "text": "ab"}] if i % 4 else [],
                    np.asarray([0, 0, 1, 1], np.float32), tokenize, rng) for i in range(c.train.batch_size)]
    batch.update({k: np.stack([r[k] for r in rows]) for k in ("dec_ids", "dec_target")})
    return batch


@pytest.fixture(scope="module")
def tiny_model():
    """``(config, model, params)`` of a tiny CLIP with a decoder, shared by the tests that need weights."""
    c = decoder_config()
    model = build_model(c.model)
    images, ids = jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, c.model.text.context_length), jnp.int32)
    return c, model, jax.jit(model.init)(jax.random.key(0), images, ids)["params"]


# ----------------------------------------------------------------------------- masking


def test_no_decoder_position_sees_the_future_and_padding_is_ignored(tiny_model):
    c, model, params = tiny_model
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
    _, tokens = jax.jit(lambda p, x: model.apply({"params": p}, x, method=CLIP.encode_image_tokens))(params, images)
    length = 7  # 4 real ids and 2 pads after them, + the last target
    ids_BL = jnp.asarray([[270, 5, 6, 7, 8, 0, 0, 0]] * 2, jnp.int32)
    target_BL = jnp.asarray([[0, 1, 1, 1, 1, 0, 0, 0]] * 2, bool)

    @jax.jit
    def features(ids_BL, parallel, target_BL=target_BL):
        prep = locca.decoder_inputs(ids_BL, target_BL, jnp.broadcast_to(parallel, (2,)), MASK_ID)
        return model.apply({"params": params}, prep["inputs"], tokens, prep["mask"], method=CLIP.decode)[0]

    base = features(ids_BL, jnp.asarray(False))
    for t in range(1, length):  # change input t: no position before t may change, t itself must
        changed = features(ids_BL.at[:, t].set(ids_BL[:, t] + 100), jnp.asarray(False))
        np.testing.assert_array_equal(changed[:, :t], base[:, :t])
        assert np.abs(changed[:, t] - base[:, t]).max() > 1e-3
    # Pads are never keys: with two pads or none, the five real positions' features agree.
    for parallel in (jnp.asarray(False), jnp.asarray(True)):
        short = features(ids_BL[:, :6], parallel, target_BL[:, :6])
        np.testing.assert_allclose(features(ids_BL, parallel)[:, :5], short[:, :5], rtol=0, atol=1e-6)
    # Parallel rows: every target id is the mask token, so no target id reaches any position.
    np.testing.assert_array_equal(features(ids_BL.at[:, 2:5].set(42), jnp.asarray(True)), features(ids_BL, jnp.asarray(True)))


def test_parallel_prediction_inputs():
    ids_BL = jnp.asarray([[270, 5, 6, 7, 0, 0], [271, 9, 3, 4, 8, 0]], jnp.int32)
    target_BL = jnp.asarray([[0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]], bool)
    prep = locca.decoder_inputs(ids_BL, target_BL, jnp.asarray([False, True]), MASK_ID)
    # Causal row: its own ids. Parallel row: the prefix (task, 9, 3) kept, the targets 4, 8 masked.
    np.testing.assert_array_equal(prep["inputs"], [[270, 5, 6, 7, 0], [271, 9, 3, MASK_ID, MASK_ID]])
    np.testing.assert_array_equal(prep["targets"], [[5, 6, 7, 0, 0], [9, 3, 4, 8, 0]])
    np.testing.assert_array_equal(prep["weights"], [[1, 1, 1, 0, 0], [0, 0, 1, 1, 0]])
    tril = np.tril(np.ones((5, 5), bool))
    np.testing.assert_array_equal(prep["mask"][0], tril & [True, True, True, True, False])
    np.testing.assert_array_equal(prep["mask"][1], np.broadcast_to([True] * 5, (5, 5)))


# ----------------------------------------------------------------------------- the chunked loss


def _reference_nll(h, w, t):
    logits = h.astype(np.float64) @ w.astype(np.float64)
    m = logits.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
    return lse - logits[np.arange(len(t)), t], logits


def test_chunked_cross_entropy_equals_float64_with_its_gradients():
    rng = np.random.default_rng(0)
    n, d, v = 24, 16, 1000  # 1000 = 7 chunks of 144 and a partial one
    h = rng.normal(size=(n, d)).astype(np.float32)
    w = (rng.normal(size=(d, v)) * 0.5).astype(np.float32)
    t = rng.integers(0, v, n).astype(np.int32)
    g = rng.uniform(0, 1, n).astype(np.float32)
    nll, vjp = jax.vjp(lambda h, w: vocab_loss.token_nll(h, w, t, 144), h, w)
    ref, logits = _reference_nll(h, w, t)
    np.testing.assert_allclose(nll, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    dh, dw = vjp(jnp.asarray(g))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(n), t] -= 1.0
    p *= g[:, None].astype(np.float64)
    np.testing.assert_allclose(dh, p @ w.T.astype(np.float64), atol=1e-5)
    np.testing.assert_allclose(dw, h.T.astype(np.float64) @ p, atol=1e-5)


def _temp_bytes(fn, n, d, v):
    specs = (jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
             jax.ShapeDtypeStruct((n,), jnp.int32))
    grad = jax.jit(jax.grad(lambda h, w, t: jnp.sum(fn(h, w, t)), argnums=(0, 1)))
    return grad.lower(*specs).compile().memory_analysis().temp_size_in_bytes


def test_chunked_cross_entropy_memory_is_flat_in_the_vocabulary():
    n, d = 512, 32
    chunked = lambda h, w, t: vocab_loss.token_nll(h, w, t, 512)
    dense = lambda h, w, t: vocab_loss.dense_sequence_nll(h[None], w, t[None])[0]
    # Besides one buffer the size of w's gradient (d x v floats), the same chunk-sized temporaries.
    rest = {v: _temp_bytes(chunked, n, d, v) - d * v * 4 for v in (4096, 65536)}
    assert rest[65536] <= rest[4096] + 64 * 1024, rest  # 16x the vocabulary, no more
    assert max(rest.values()) <= 2 * n * 512 * 4, rest  # two [N, chunk] float32 tiles at most
    logits = n * 65536 * 4  # the [N, V] float32 logits the chunks avoid: 128 MiB
    # Positive control: the dense loss holds the logits (at least once).
    assert _temp_bytes(dense, n, d, 65536) >= logits


# ----------------------------------------------------------------------------- coordinates


def test_coordinate_tokens_round_trip():
    bins = 32
    x = np.linspace(0.0, 1.0, 1001)
    q = quantise(x, bins)
    assert q.min() == 0 and q.max() == bins - 1
    assert np.all(np.abs(dequantise(q, bins) - x) <= 0.5 / bins + 1e-12)
    k = np.arange(bins)
    np.testing.assert_array_equal(quantise(dequantise(k, bins), bins), k)
    np.testing.assert_array_equal(quantise(np.asarray([0.0, 1 / 32, 0.999, 1.0]), bins), [0, 1, 31, 31])
    # A box seen through a crop: the right half of the image, the box in its top half.
    (box, text), = regions_in_crop([{"box": [0.6, 0.1, 0.8, 0.4], "text": "x"}, {"box": [0.0, 0, 0.4, 1], "text": "y"}],
                                   np.asarray([0.5, 0.0, 1.0, 1.0]), 0.5)
    np.testing.assert_allclose(box, [0.2, 0.1, 0.6, 0.4])
    t = DecoderTargets(text_vocab=100, num_bins=bins, length=12, mix=(0, 1, 0))
    seq = t.build(np.asarray([1, 7, 2, 0]), [{"box": [0.6, 0.1, 0.8, 0.4], "text": "x"}],
                  np.asarray([0.5, 0.0, 1.0, 1.0]), lambda s: np.asarray([[1, 50, 2]]), np.random.default_rng(0))
    aref = t.task_id("aref")
    np.testing.assert_array_equal(seq["dec_ids"], [aref, 50, 2, 106, 103, 119, 112, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(seq["dec_target"], [0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(dequantise(seq["dec_ids"][3:7] - 100, bins), box, atol=0.5 / bins)


# ----------------------------------------------------------------------------- the step


def test_sharded_step_equals_unsharded(devices):
    # eps=1 keeps Adam's first step linear in the gradient (see test_train_step), so the
    # updates compare the gradients.
    opts = {"optim.eps": 1.0, "optim.weight_decay": 0.0, "optim.warmup_steps": 0, "model.decoder.depth": 1}
    batches = [decoder_batch(decoder_config(), 0)]
    one, h1 = run_steps(decoder_config(**opts, **{"mesh.data": 1}), batches, devices[:1])
    eight, h8 = run_steps(decoder_config(**opts, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}), batches,
                          devices)
    for key in ("train/loss", "train/decoder_loss", "train/decoder_cap_loss", "train/decoder_aref_loss",
                "train/decoder_gcap_loss"):
        np.testing.assert_allclose(h8[0][key], h1[0][key], rtol=1e-5)
    assert h1[0]["train/decoder_aref_loss"] > 0 and h1[0]["train/decoder_gcap_loss"] > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(eight.params["decoder"]), jax.device_get(one.params["decoder"]))


def test_greedy_decoding_with_the_kv_cache_equals_the_full_forward(devices, tiny_model):
    from clipjax.evals.captioning import greedy_decoder

    c, model, params = tiny_model
    batch = make_batch(c, 0)
    crops = {k: jnp.asarray(batch[k][:8]) for k in ("image", "image_box", "image_hw")}
    length = c.model.decoder.max_length
    prefix = np.zeros((8, length), np.int32)
    prefix[:, 0], prefix[:, 1] = 270, np.arange(8) + 3
    plen, lo, hi = np.full(8, 1 + (np.arange(8) % 2)), np.zeros(8), np.full(8, 259)
    with jax.set_mesh(sharding.mesh_from_config(c.mesh, devices[:1])):
        ids = np.asarray(greedy_decoder(model, c.model, c.data.interpolation)(
            params, crops, jnp.asarray(prefix), *(jnp.asarray(x, jnp.int32) for x in (plen, lo, hi))))
    from clipjax.data import resize

    @jax.jit
    def forward(params, crops, ids):  # causal, uncached
        images = resize.model_images(crops, 16, c.data.interpolation)
        _, tokens = model.apply({"params": params}, images, method=CLIP.encode_image_tokens)
        return model.apply({"params": params}, ids, tokens, method=CLIP.decode)

    h, w = forward(params, crops, jnp.asarray(ids))
    greedy = np.asarray(jnp.argmax((h @ w)[:, :, :259], axis=-1))
    for b in range(8):
        p = plen[b]
        np.testing.assert_array_equal(ids[b, :p], prefix[b, :p])
        np.testing.assert_array_equal(ids[b, p:], greedy[b, p - 1:-1])


def test_resume_with_the_decoder_is_bitwise(tmp_path):
    import shutil

    from clipjax import checkpoint as ckpt_lib
    from clipjax.config import load_config
    from clipjax.train import train
    from helpers import DEMO, final_params, losses_of

    def config(steps):
        c = load_config(f"{DEMO}:smoke,decoder,data={tmp_path / 'synthetic'}",
                        [f"--config.train.steps={steps}", "--config.checkpoint.every=2",
                         "--config.checkpoint.async_save=false", "--config.train.log_every=1"])
        with c.unlocked():
            c.evals = ml_collections.ConfigDict()
        return c

    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    train(config(4), ref)
    # The run resumes from the reference's step-2 checkpoint (a copy: one training fewer).
    shutil.copytree(ckpt_lib.checkpoint_dir(ref), ckpt_lib.checkpoint_dir(run), ignore=shutil.ignore_patterns("4"))
    train(config(4), run)
    assert losses_of(run) == {s: l for s, l in losses_of(ref).items() if s > 2}
    (s1, p1), (s2, p2) = final_params(ref), final_params(run)
    assert s1 == s2 == 4 and "decoder" in p1
    jax.tree.map(np.testing.assert_array_equal, p1, p2)


def test_two_tower_export_leaves_the_decoder_out(tiny_model):
    from clipjax.interop import openclip

    with_dec, _, params = tiny_model
    plain = decoder_config(**{"model.decoder.enabled": False})
    assert "decoder" in params
    towers = {k: v for k, v in params.items() if k != "decoder"}
    sd = openclip.state_dict_from_params(params, with_dec.model)
    ref = openclip.state_dict_from_params(towers, plain.model)
    assert sorted(sd) == sorted(ref)
    for k in sd:
        np.testing.assert_array_equal(sd[k], ref[k])


# ----------------------------------------------------------------------------- regions in records


def test_converters_write_regions(tmp_path):
    import json

    from clipjax.data.convert import ConvertError, ConvertOptions, convert_coco, convert_csv

    imgs = tmp_path / "images"
    imgs.mkdir()
    for i in (1, 2):
        (imgs / f"{i}.jpg").write_bytes(sample_images()["jpeg"])
    captions = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in (1, 2)],
                "annotations": [{"image_id": i, "caption": f"cap {i}"} for i in (1, 2)]}
    instances = {"images": [{"id": 1, "file_name": "1.jpg", "width": 200, "height": 100}],
                 "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
                 "annotations": [{"image_id": 1, "bbox": [20, 10, 100, 50], "category_id": 3},
                                 {"image_id": 1, "bbox": [0, 0, 200, 100], "category_id": 7}]}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    convert_coco(str(tmp_path / "captions.json"), str(imgs), ConvertOptions(out_dir=str(tmp_path / "coco")),
                 instances=str(tmp_path / "instances.json"))
    one, two = read_back(tmp_path / "coco")
    assert one.regions == [{"box": [0.1, 0.1, 0.6, 0.6], "text": "cat"}, {"box": [0, 0, 1, 1], "text": "dog"}]
    assert two.regions == []

    regions = [{"box": [0.25, 0.5, 0.75, 1.0], "text": "a dog"}]
    rows = [("images/1.jpg", "a dog", json.dumps(regions)), ("images/2.jpg", "nothing", "")]
    (tmp_path / "d.tsv").write_text("filepath\ttitle\tregions\n" + "\n".join("\t".join(r) for r in rows) + "\n")
    convert_csv(str(tmp_path / "d.tsv"), ConvertOptions(out_dir=str(tmp_path / "csv")), regions_column="regions")
    one, two = read_back(tmp_path / "csv")
    assert (one.regions, two.regions) == (regions, [])
    (tmp_path / "bad.tsv").write_text('filepath\ttitle\tregions\nimages/1.jpg\tx\t[{"box": [0.5, 0, 0.2, 1], "text": "y"}]\n')
    with pytest.raises(ConvertError, match=r"bad.tsv line 2 column regions: region box \[0.5, 0, 0.2, 1\]"):
        convert_csv(str(tmp_path / "bad.tsv"), ConvertOptions(out_dir=str(tmp_path / "bad")), regions_column="regions")
