"""The grain input pipeline: process sharding, shuffling, resume, bad images, eval, mesh, TFDS."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from clipjax import sharding
from clipjax.data import config as data_config_lib
from clipjax.data import eval_input, records, train_input, transforms
from helpers import assert_same, index_of, png

N = 37  # odd, so the two processes get 19 and 18 records
SIZE = 8  # tiny output images keep the tests fast
BUF = transforms.ImageOptions(SIZE).buffer_size  # side of the uint8 crop buffers


def _write(folder: str, split: str, examples: list[records.Example], shards: int = 2) -> str:
    for k in range(shards):
        lo, hi = k * len(examples) // shards, (k + 1) * len(examples) // shards
        with records.ShardWriter(os.path.join(folder, records.shard_name(split, k, shards))) as w:
            for ex in examples[lo:hi]:
                w.write(ex)
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("shards"))
    train = [records.Example(f"k{i}", png(i, 20 + i % 5, 14 + i % 3), [f"first {i}", f"second {i}", f"third {i}"], i % 5)
             for i in range(N)]
    # eval: a varying number of captions (0..6) to exercise K-padding and truncation
    evals = [records.Example(f"e{i}", png(i), [f"c{j} of {i}" for j in range(i % 7)], i % 5) for i in range(N)]
    _write(folder, "train", train)
    _write(folder, "val", evals, shards=1)
    return folder


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory) -> str:
    """40 records, every 4th image undecodable (garbage bytes or a truncated PNG)."""
    folder = str(tmp_path_factory.mktemp("bad"))
    exs = []
    for i in range(40):
        image = png(i)
        if i % 8 == 1:
            image = b"not an image at all"
        elif i % 8 == 5:
            image = image[: len(image) // 2]
        exs.append(records.Example(f"b{i}", image, [f"cap {i}"], -1))
    return _write(folder, "train", exs)


def _cfg(folder: str, **kw):
    c = data_config_lib.data_config()
    c.source, c.path, c.num_workers, c.prefetch = "arrayrecord", folder, 0, 0
    for k, v in kw.items():
        c[k] = v
    return c


def _train(cfg, *, batch=8, seed=0, pi=0, pc=1, mesh=None) -> train_input.TrainIterator:
    return train_input.make_train_iterator(cfg, global_batch_size=batch, image_size=SIZE, context_length=16, seed=seed,
                                        mesh=mesh, process_index=pi, process_count=pc)


def _take(it, n: int) -> list[dict]:
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def _indices(batches: list[dict]) -> np.ndarray:
    return np.concatenate([index_of(b["image"]) for b in batches])


def test_processes_partition_each_epoch(shards):
    # global batch 8 over 2 processes = 4 per process; 5 batches = 20 >= 19 records each
    per_proc = [_indices(_take(_train(_cfg(shards), pi=p, pc=2), 10)) for p in range(2)]
    n0, n1 = (N + 1) // 2, N // 2
    e0 = [per_proc[0][:n0], per_proc[1][:n1]]
    assert len(set(e0[0]) | set(e0[1])) == N and not set(e0[0]) & set(e0[1])
    assert sorted(np.concatenate(e0)) == list(range(N))
    # epoch 1: again a partition of the whole epoch, in another order
    e1 = [per_proc[0][n0:2 * n0], per_proc[1][n1:2 * n1]]
    assert sorted(np.concatenate(e1)) == list(range(N))
    assert not np.array_equal(np.concatenate(e0), np.concatenate(e1))


def test_shuffle_order_depends_on_seed_only(shards):
    a = _indices(_take(_train(_cfg(shards), seed=3), 4))
    b = _indices(_take(_train(_cfg(shards), seed=3), 4))
    c = _indices(_take(_train(_cfg(shards), seed=4), 4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, np.arange(len(a)))
    plain = _indices(_take(_train(_cfg(shards, shuffle=False)), 5))
    np.testing.assert_array_equal(plain, np.arange(40) % N)


def test_each_epoch_draws_new_crops_and_captions(shards):
    """Unshuffled, record i is at position i (epoch 0) and i + N (epoch 1): another crop, another caption."""
    rows = {k: np.concatenate([np.asarray(b[k]) for b in _take(_train(_cfg(shards, shuffle=False)), 10)])
            for k in ("image", "image_box", "text")}
    assert np.array_equal(index_of(rows["image"][N:2 * N]), np.arange(N))  # the same records, one epoch later
    first, second = slice(0, N), slice(N, 2 * N)
    new_box = np.any(rows["image_box"][first] != rows["image_box"][second], axis=1)
    new_text = np.any(rows["text"][first] != rows["text"][second], axis=1)
    # Crops of 20x14 px images take few distinct integer boxes; the same seed gives none (0 of N).
    assert new_box.mean() > 0.15
    assert 0.4 < new_text.mean() < 0.9  # another of 3 captions about 2/3 of the time


def test_resume_gives_the_uninterrupted_batches(shards):
    cfg = _cfg(shards, prefetch=2)  # with the prefetch thread, whose buffer must not leak into the state
    whole = _take(_train(cfg), 9)
    it = _train(cfg)
    first = [next(it) for _ in range(4)]
    state = it.get_state()
    it.close()
    assert state == {"position": 32, "num_skipped": 0}
    fresh = _train(cfg)
    fresh.set_state(state)
    assert_same(first + _take(fresh, 5), whole)


def test_workers_match_no_workers_and_resume_across_worker_counts(shards):
    ref = _take(_train(_cfg(shards)), 6)
    it = _train(_cfg(shards, num_workers=2, prefetch=1))
    got = [next(it) for _ in range(3)]
    state = it.get_state()
    it.close()
    assert_same(got, ref[:3])
    fresh = _train(_cfg(shards))  # resume with another worker count
    fresh.set_state(state)
    assert_same(_take(fresh, 3), ref[3:])


def test_orbax_checkpoint_roundtrip(shards, tmp_path):
    import orbax.checkpoint as ocp

    whole = _take(_train(_cfg(shards)), 5)
    it = _train(_cfg(shards))
    head = [next(it) for _ in range(2)]
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.save(2, args=ocp.args.Composite(data=it.save_args()))
        mngr.wait_until_finished()
        it.close()
        fresh = _train(_cfg(shards))
        mngr.restore(2, args=ocp.args.Composite(data=fresh.restore_args()))
    assert_same(head + _take(fresh, 3), whole)


def test_bad_images_are_skipped_and_counted(bad_shards):
    it = _train(_cfg(bad_shards, shuffle=False, max_skip_fraction=0.6, prefetch=2), batch=10)
    batches, skipped = [], []
    for _ in range(3):  # 30 good images need all 40 records
        batches.append(next(it))
        skipped.append(it.num_skipped)  # the prefetch thread has read further: the count follows the batch
    good = _indices(batches)
    np.testing.assert_array_equal(good, [i for i in range(40) if i % 4 != 1])
    # cumulative count of the bad records read up to each batch's last good one
    assert skipped == [sum(1 for i in range(g + 1) if i % 4 == 1) for g in good[9::10]]
    assert skipped[-1] == 10


def test_too_many_bad_images_raise(bad_shards):
    it = _train(_cfg(bad_shards, max_skip_fraction=0.05, skip_check_after=8), batch=10)
    with pytest.raises(train_input.DataError, match=r"max_skip_fraction=0\.05"):
        _take(it, 3)


def test_eval_pads_the_last_batch_and_masks(shards):
    K = 4
    seen_labels = []
    for p in range(2):
        ev = eval_input.make_eval_iterator(_cfg(shards), split="val", batch_size=16, image_size=SIZE, context_length=16,
                                         max_captions=K, process_index=p, process_count=2)
        batches = list(ev)
        assert len(batches) == len(ev) == 3  # ceil(19 / 8) on both processes
        mask = np.concatenate([b["mask"] for b in batches])
        assert mask.sum() == (19 if p == 0 else 18) and mask[: mask.sum()].all()
        b = batches[0]
        assert b["image"].shape == (8, BUF, BUF, 3) and b["image"].dtype == np.uint8
        assert b["image_box"].shape == (8, 4) and b["image_hw"].shape == (8, 2)
        assert b["text"].shape == (8, K, 16) and b["text"].dtype == np.int32
        assert b["text_mask"].shape == (8, K) and b["label"].dtype == np.int32
        idx = np.concatenate([index_of(b["image"]) for b in batches])[mask]
        np.testing.assert_array_equal(idx, np.arange(p, N, 2))  # unshuffled, strided
        labels = np.concatenate([b["label"] for b in batches])
        np.testing.assert_array_equal(labels[mask], idx % 5)
        assert (labels[~mask] == -1).all()
        n_caps = np.concatenate([b["text_mask"] for b in batches]).sum(1)
        np.testing.assert_array_equal(n_caps[mask], np.minimum(idx % 7, K))
        seen_labels.append(labels[mask])
    assert sum(len(x) for x in seen_labels) == N


def test_global_arrays_on_a_mesh(shards, devices):
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1}, devices=devices)
    ref = _take(_train(_cfg(shards), batch=16), 2)
    got = _take(_train(_cfg(shards), batch=16, mesh=mesh), 2)
    for r, g in zip(ref, got):
        assert isinstance(g["image"], jax.Array)
        assert sorted(g) == sorted(r) == ["image", "image_box", "image_hw", "text"]
        for key in ("image", "image_box", "image_hw", "text"):
            nd = r[key].ndim
            assert g[key].sharding.is_equivalent_to(sharding.batch_sharding(mesh, nd), nd)
            np.testing.assert_array_equal(np.asarray(g[key]), r[key])


def test_tfds_source_with_mock_data():
    import tensorflow_datasets as tfds

    cfg = data_config_lib.data_config()
    cfg.source, cfg.tfds_name, cfg.num_workers, cfg.prefetch = "tfds", "mnist", 0, 0
    with tfds.testing.mock_data(num_examples=12):
        batch = _take(_train(cfg, batch=4), 4)[-1]
        assert batch["image"].shape == (4, BUF, BUF, 3) and batch["text"].shape == (4, 16)
        ev = eval_input.make_eval_iterator(cfg, split="test", batch_size=8, image_size=SIZE, context_length=16,
                                         max_captions=2, process_index=0, process_count=1)
        batches = list(ev)
    assert len(batches) == 2 and sum(int(b["mask"].sum()) for b in batches) == 12
    labels = np.concatenate([b["label"] for b in batches])[:12]
    assert ((labels >= 0) & (labels < 10)).all()
    assert np.concatenate([b["text_mask"] for b in batches])[:12, 0].all()  # "a photo of a 3." from the class name


def test_validate_data_config_names_the_key():
    c = data_config_lib.data_config()
    data_config_lib.validate_data_config(c)
    for key, value, needle in [("source", "parquet", "config.data.source"),
                               ("crop_scale", (0.5, 1.2), "config.data.crop_scale"),
                               ("caption_choice", "longest", "config.data.caption_choice"),
                               ("max_skip_fraction", 2.0, "config.data.max_skip_fraction")]:
        bad = data_config_lib.data_config()
        bad[key] = value
        with pytest.raises(ValueError, match=needle):
            data_config_lib.validate_data_config(bad)
    bad = data_config_lib.data_config()
    bad.source = "arrayrecord"
    with pytest.raises(ValueError, match="config.data.path"):
        data_config_lib.validate_data_config(bad)


def test_stream_continues_under_another_process_count(shards):
    # 2 processes, 3 steps of 4 each, then 1 process:
    # the 1-process stream goes on from the first global slot neither process had read.
    two = [_train(_cfg(shards), pi=p, pc=2) for p in range(2)]
    read = [_indices([next(it) for _ in range(3)]) for it in two]
    states = [it.get_state() for it in two]
    for it in two:
        it.close()
    one = _train(_cfg(shards), pc=1, batch=4)
    one.set_state_from_processes(states)
    nxt = _indices(_take(one, 3))
    # the uninterrupted 1-process stream, in global slot order
    ref = _indices(_take(_train(_cfg(shards), pc=1, batch=4), 9))
    assert sorted(np.concatenate(read)) == sorted(ref[:24])
    np.testing.assert_array_equal(nxt, ref[24:36])
    # and back: 1 process -> 2 processes split the rest of the same global stream
    one = _train(_cfg(shards), pc=1, batch=4)
    _ = [next(one) for _ in range(5)]
    state = one.get_state()
    one.close()
    halves = []
    for p in range(2):
        it = _train(_cfg(shards), pi=p, pc=2)
        it.set_state_from_processes([state])
        halves.append(_indices(_take(it, 2)))
    assert sorted(np.concatenate(halves)) == sorted(ref[20:36])
