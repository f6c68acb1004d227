"""``clipjax.load``: embeddings, zero-shot equal to clipjax-eval's, and the clipjax-embed / clipjax-predict commands.

One small model (random weights, saved as a run's checkpoint) and a converted labelled folder
serve every test; the programs compile once per shape.
"""

import os
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

import clipjax
from clipjax import checkpoint as ckpt_lib
from clipjax import config as config_lib
from clipjax.data import cli as data_cli
from clipjax.data import records
from clipjax.inference_cli import embed_main, predict_main
from clipjax.models import build_model, dummy_inputs

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ("blue_bar", "green_disc", "red_square")
COLOURS = {"red_square": (220, 30, 30), "green_disc": (30, 200, 40), "blue_bar": (40, 50, 220)}
SMALL = ["--config.model.image.width=32", "--config.model.image.depth=1", "--config.model.image.heads=2",
         "--config.model.image.mlp_dim=64", "--config.model.image.image_size=32",
         "--config.model.text.width=32", "--config.model.text.depth=1", "--config.model.text.heads=2",
         "--config.model.text.mlp_dim=64", "--config.model.text.context_length=16", "--config.model.embed_dim=16"]


def _photos(root: pathlib.Path) -> None:
    rng = np.random.default_rng(1)
    for cls in CLASSES:
        (root / cls).mkdir(parents=True)
        for i in range(4):
            h, w = rng.integers(30, 70, size=2)
            img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
            img[h // 4:, : w // 2] = COLOURS[cls]
            Image.fromarray(img).save(root / cls / f"{i}.png")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(config, workdir, shard folder, photo folder): a saved random model and a converted labelled folder."""
    tmp = tmp_path_factory.mktemp("inference")
    photos, data, work = tmp / "photos", tmp / "data", tmp / "run"
    _photos(photos)
    assert data_cli.main(["convert", "folder", str(photos), f"--out={data}", "--split=test"]) == 0
    config = config_lib.load_config(f"{ROOT / 'configs' / 'custom.py'}:data={data},image_size=32", SMALL)
    config_lib.validate(config, jax.device_count())
    model = build_model(config.model)
    params = jax.jit(model.init)(jax.random.key(3), *dummy_inputs(config.model))["params"]
    params = jax.tree.map(lambda a: getattr(a, "value", a), params, is_leaf=lambda a: hasattr(a, "value"))
    saver = ckpt_lib.Checkpointer(str(work), every=1, keep=1, async_save=False, config_json=config.to_json())
    saver.save(7, {"params": params})
    saver.close()
    return config, str(work), str(data), photos


@pytest.fixture(scope="module")
def model(run):
    return clipjax.load(run[1], batch_size=8)


def _shard_examples(data: str) -> list[records.Example]:
    import grain

    source = grain.sources.ArrayRecordDataSource(records.shard_paths(data, "test"))
    return [records.decode(source[i]) for i in range(len(source))]


def test_zero_shot_accuracy_equals_clipjax_eval(run, model, caplog):
    from clipjax import evaluate

    config, work, data, _ = run
    metrics = evaluate.evaluate(config, work)
    assert not [r for r in caplog.records if "Metadata file does not exist" in r.getMessage()]  # orbax's noise
    examples = _shard_examples(data)
    classnames = (pathlib.Path(data) / "classes.txt").read_text().split()
    result = model.zero_shot([ex.image for ex in examples], [c.replace("_", " ") for c in classnames], "single")
    labels = np.asarray([ex.label for ex in examples])
    assert model.step == 7 and len(examples) == 12
    assert np.mean(result.index == labels) == metrics["zeroshot/zeroshot/top1"]
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, rtol=1e-5)
    # The eval's retrieval counts a caption identical to a right one as right ("a photo of a blue bar." is
    # every blue bar's caption): image->text top-1 is then the zero-shot top-1 with a single template.
    captions = [ex.captions[0] for ex in examples]
    s = model.encode_images([ex.image for ex in examples]) @ model.encode_texts(captions).T
    right = np.asarray(captions)[:, None] == np.asarray(captions)[None, :]
    i2t_r1 = np.mean([not (s[i][~right[i]] >= s[i][right[i]].max()).any() for i in range(len(examples))])
    assert metrics["retrieval/retrieval/i2t_r1"] == i2t_r1 > 0


def test_embeddings_batch_and_pad_like_one_unpadded_call(model, run):
    """13 texts in batches of 8 (the last padded) equal the model applied to all 13 at once."""
    config = run[0]
    texts = [f"a photo of {n} shapes" for n in range(13)]
    got = model.encode_texts(texts)
    ids = np.asarray(model.tokenizer(texts), np.int32)
    from clipjax.models import CLIP

    params = jax.device_get(model.params)
    want = build_model(config.model).apply({"params": params}, ids, method=CLIP.encode_text)
    np.testing.assert_allclose(got, np.asarray(want), atol=2e-6)
    assert got.shape == (13, 16)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_clipjax_embed_equals_the_api(model, run, tmp_path):
    _, work, data, photos = run
    out = tmp_path / "z.npy"
    assert embed_main([data, f"--model={work}", f"--out={out}", "--batch_size=8"]) == 0
    keys = (tmp_path / "z.keys.txt").read_text().splitlines()
    images = [ex.image for ex in _shard_examples(data)]
    np.testing.assert_array_equal(np.load(out), model.encode_images(images))
    assert keys == [ex.key for ex in _shard_examples(data)]

    import pyarrow.parquet as pq

    pq_out = tmp_path / "folder.parquet"
    assert embed_main([str(photos), f"--model={work}", f"--out={pq_out}", "--batch_size=8"]) == 0
    table = pq.read_table(pq_out).to_pydict()
    paths = sorted(str(p) for p in photos.glob("*/*.png"))
    assert table["key"] == [os.path.relpath(p, photos) for p in paths]
    np.testing.assert_array_equal(np.asarray(table["embedding"], np.float32), model.encode_images(paths))

    txt = tmp_path / "texts.npy"
    assert embed_main([data, f"--model={work}", f"--out={txt}", "--texts", "--batch_size=8"]) == 0
    captions = [c for ex in _shard_examples(data) for c in ex.captions]
    np.testing.assert_array_equal(np.load(txt), model.encode_texts(captions))


def test_clipjax_predict_prints_classes_and_folder_accuracy(model, run, capsys):
    _, work, _, photos = run
    names = ",".join(c.replace("_", " ") for c in CLASSES)
    assert predict_main([str(photos), f"--model={work}", f"--classes={names}", "--batch_size=8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    paths = sorted(str(p) for p in photos.glob("*/*.png"))
    result = model.zero_shot(paths, [c.replace("_", " ") for c in CLASSES])
    assert [line.split("\t")[:2] for line in lines[:-1]] == [
        [os.path.relpath(p, photos), label] for p, label in zip(paths, result.labels)]
    truth = np.repeat(np.arange(3), 4)
    assert lines[-1].startswith(f"accuracy {np.mean(result.index == truth):.4f} over 12 images")


def test_user_errors_are_one_line(run, tmp_path, capsys):
    _, work, data, photos = run
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not an image")
    assert embed_main([str(bad), f"--model={work}", f"--out={tmp_path / 'o.npy'}"]) == 2
    assert predict_main([str(photos), f"--model={tmp_path / 'nothing'}", "--classes=a,b"]) == 2
    assert embed_main([data, f"--model={work}", f"--out={tmp_path / 'o.txt'}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3
    assert "x.png: cannot read the image" in err[0]
    assert "nothing: no such file or folder" in err[1]
    assert "expected FILE.npy or FILE.parquet" in err[2]


def test_load_openclip_weights_through_the_same_api(model, tmp_path):
    """An OpenCLIP export of the run (readable by others: not 0600) loads with clipjax.load and embeds texts alike."""
    from clipjax.interop import openclip

    path = tmp_path / "export" / "model.safetensors"
    model_cfg = openclip.export_weights(jax.device_get(model.params), model.config.model, str(path))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    other = clipjax.load(path, model=model_cfg, batch_size=8)
    assert other.step is None and other.config.data.tokenizer == model.config.data.tokenizer
    texts = ["a photo of a red square.", "a blue bar"]
    np.testing.assert_allclose(other.encode_texts(texts), model.encode_texts(texts), atol=1e-6)
