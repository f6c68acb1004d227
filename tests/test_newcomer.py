"""The README's "Train on your own images" path, run as written on labelled images made here.

A labelled image folder and a labelled CSV go through ``clipjax-data convert``, a few
training steps of ``configs/custom.py`` and ``clipjax-eval``; zero-shot must score the
labelled held-out images (every one of them), not report NaN over nothing.
"""

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUSTOM = str(ROOT / "configs" / "custom.py")
CLASSES = ("red_square", "green_disc", "blue_bar")
COLOURS = {"red_square": (220, 30, 30), "green_disc": (30, 200, 40), "blue_bar": (40, 50, 220)}
PER_CLASS = {"train": 8, "test": 3}

pytestmark = pytest.mark.slow


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(*args, cwd):
    proc = subprocess.run([sys.executable, *args], env=_env(), cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{args}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def _data(*args, cwd):
    return _run("-m", "clipjax.data.cli", *args, cwd=cwd)


def _train(*args, cwd):
    return _run("-c", "from clipjax.main import train_main; train_main()", *args, cwd=cwd)


def _eval(*args, cwd):
    return _run("-c", "from clipjax.main import eval_main; eval_main()", *args, cwd=cwd)


def _photos(root: pathlib.Path) -> None:
    """``root/<split>/<class>/<i>.png``: a coloured shape on noise, size and place varying."""
    rng = np.random.default_rng(0)
    for split, n in PER_CLASS.items():
        for cls in CLASSES:
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(40, 90, size=2)
                img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
                y, x = rng.integers(0, h // 3), rng.integers(0, w // 3)
                img[y:y + h // 2, x:x + w // 2] = COLOURS[cls]
                Image.fromarray(img).save(d / f"{i}.png")


def _eval_json(workdir: pathlib.Path) -> dict:
    (path,) = sorted(workdir.glob("eval_*.json"))
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    _photos(root)
    return root


def test_folder_convert_train_eval(photos, tmp_path):
    data, work = tmp_path / "data", tmp_path / "run"
    _data("convert", "folder", str(photos / "train"), f"--out={data}", cwd=tmp_path)
    _data("convert", "folder", str(photos / "test"), f"--out={data}", "--split=test", cwd=tmp_path)
    assert (data / "classes.txt").read_text().split("\n")[:3] == sorted(CLASSES)

    spec = f"--config={CUSTOM}:data={data},steps=4,batch=16"
    _train(spec, f"--workdir={work}", "--config.evals.zeroshot.every=0", cwd=tmp_path)
    _eval(spec, f"--workdir={work}", cwd=tmp_path)

    m = _eval_json(work)["metrics"]
    n_test = PER_CLASS["test"] * len(CLASSES)
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert any("zeroshot/zeroshot/top1" in r for r in rows)  # the end-of-training eval is logged ...
    for r in rows:  # ... and every logged value is a number (or null), never a formatted string
        assert all(v is None or isinstance(v, (int, float)) for v in r.values()), r
    assert m["zeroshot/zeroshot/num_examples"] == n_test
    assert 0.0 <= m["zeroshot/zeroshot/top1"] <= 1.0
    assert m["retrieval/retrieval/num_images"] == n_test


def test_labelled_csv_convert_and_eval(photos, tmp_path):
    """Class-name labels in a CSV column: converted with classes.txt, scored by zero-shot."""
    rows = [(str(p.relative_to(photos)), f"a picture of a {p.parent.name.replace('_', ' ')}", p.parent.name)
            for p in sorted(photos.glob("*/*/*.png"))]
    for split in PER_CLASS:
        with open(photos / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filepath", "title", "label"])
            w.writerows(r for r in rows if r[0].startswith(split + os.sep))
    data, work = tmp_path / "data", tmp_path / "run"
    for split in PER_CLASS:
        _data("convert", "csv", f"--csv={photos / (split + '.csv')}", "--label_column=label", f"--out={data}",
              f"--split={split}", cwd=tmp_path)
    assert sorted((data / "classes.txt").read_text().split()) == sorted(CLASSES)

    spec = f"--config={CUSTOM}:data={data},steps=2,batch=16"
    _train(spec, f"--workdir={work}", cwd=tmp_path)
    _eval(spec, f"--workdir={work}", cwd=tmp_path)
    m = _eval_json(work)["metrics"]
    assert m["zeroshot/zeroshot/num_examples"] == PER_CLASS["test"] * len(CLASSES)
