"""Labels through the converters: CSV label column, COCO categories, class folders, classes.txt,
and what zero-shot eval reads back from the converted split."""

import json

import pytest

from clipjax.data.cli import main as cli_main
from clipjax.data.convert import ConvertError, ConvertOptions, convert_coco, convert_csv
from clipjax.data.sources import open_source
from clipjax.evals.classnames import get_classnames
from helpers import read_back, sample_images


def _labelled_csv(root, rows, name="data.csv"):
    root.mkdir(exist_ok=True)
    for img, _, _ in rows:
        (root / img).write_bytes(sample_images()["jpeg"])
    lines = ["filepath,title,label"] + [f"{i},{c},{l}" for i, c, l in rows]
    (root / name).write_text("\n".join(lines) + "\n")
    return str(root / name)


def test_csv_class_name_labels_and_splits_share_classes_txt(tmp_path):
    out = tmp_path / "out"
    train = _labelled_csv(tmp_path / "a", [("1.jpg", "one", "dog"), ("2.jpg", "two", "cat"), ("3.jpg", "x", ""),
                                           ("1.jpg", "again", "dog")])
    s = convert_csv(train, ConvertOptions(out_dir=str(out)), label_column="label")
    assert (out / "classes.txt").read_text() == "cat\ndog\n"
    assert s["written"] == 3 and s["labelled"] == 2 and s["classes"] == 2
    assert {e.key: e.label for e in read_back(out)} == {"1.jpg": 1, "2.jpg": 0, "3.jpg": -1}
    # a later split keeps the ids and appends the names it adds
    test = _labelled_csv(tmp_path / "b", [("4.jpg", "four", "bird"), ("5.jpg", "five", "dog")])
    convert_csv(test, ConvertOptions(out_dir=str(out), split="test"), label_column="label")
    assert (out / "classes.txt").read_text() == "cat\ndog\nbird\n"
    assert {e.key: e.label for e in read_back(out, "test")} == {"4.jpg": 2, "5.jpg": 1}
    # zero-shot eval of that split: labels in the batches, names from classes.txt
    names = get_classnames(str(out / "classes.txt"))
    src = open_source(f"arrayrecord:{out}", "test")  # what the eval pipeline reads
    assert [names[src[i]["label"]] for i in range(len(src))] == ["bird", "dog"]


def test_csv_integer_labels_and_conflicts(tmp_path):
    out = tmp_path / "out"
    path = _labelled_csv(tmp_path / "a", [("1.jpg", "one", "3"), ("2.jpg", "two", "0")])
    s = convert_csv(path, ConvertOptions(out_dir=str(out)), label_column="label")
    assert [e.label for e in read_back(out)] == [3, 0] and s["classes"] == 0 and not (out / "classes.txt").exists()
    bad = _labelled_csv(tmp_path / "b", [("1.jpg", "one", "cat"), ("1.jpg", "two", "dog")])
    with pytest.raises(ConvertError, match=r"image 1.jpg \(first at line 2\) has different labels \['cat', 'dog'\]"):
        convert_csv(bad, ConvertOptions(out_dir=str(tmp_path / "o2")), label_column="label")
    (tmp_path / "names.txt").write_text("zero\none\ntwo\n")
    with pytest.raises(ConvertError, match="label 3 but 3 class names"):
        convert_csv(path, ConvertOptions(out_dir=str(tmp_path / "o3")), label_column="label",
                    classes_file=str(tmp_path / "names.txt"))


def test_folder_convert_cli(tmp_path, capsys):
    root = tmp_path / "digits"
    for rel in ("seven/a.jpg", "one/b.PNG", "one/more/c.jpg", "lawn_mower/d.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(sample_images()["png" if rel.endswith("PNG") else "jpeg"])
    (root / "one" / "notes.txt").write_text("not an image")
    (root / "loose.jpg").write_bytes(sample_images()["jpeg"])  # not in a class folder
    out = tmp_path / "out"
    rc = cli_main(["convert", "folder", str(root), "--out", str(out), "--split", "test",
                   "--caption_template", "a photo of the number {}"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["written"] == 4 and summary["labelled"] == 4 and summary["classes"] == 3
    assert (out / "classes.txt").read_text() == "lawn_mower\none\nseven\n"
    assert [(e.key, e.captions, e.label) for e in read_back(out, "test")] == [
        ("lawn_mower/d.jpg", ["a photo of the number lawn mower"], 0),
        ("one/b.PNG", ["a photo of the number one"], 1),
        ("one/more/c.jpg", ["a photo of the number one"], 1),
        ("seven/a.jpg", ["a photo of the number seven"], 2)]
    assert cli_main(["convert", "folder", str(root), "--out", str(tmp_path / "o2"), "--caption_template", "x"]) == 2
    assert "needs exactly one {}" in capsys.readouterr().err


def test_coco_categories(tmp_path):
    imgs = tmp_path / "images"
    imgs.mkdir()
    for i in (1, 2, 3):
        (imgs / f"{i}.jpg").write_bytes(sample_images()["jpeg"])
    meta = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in (1, 2, 3)],
            "categories": [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}, {"id": 90, "name": "toothbrush"}],
            "annotations": [{"image_id": 1, "caption": "a dog", "category_id": 18},
                            {"image_id": 2, "caption": "a car and a dog", "category_id": 3},
                            {"image_id": 2, "category_id": 18},  # two categories: no single label
                            {"image_id": 3, "caption": "a car", "category_id": 3}]}
    (tmp_path / "c.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    s = convert_coco(str(tmp_path / "c.json"), str(imgs), ConvertOptions(out_dir=str(out)))
    assert (out / "classes.txt").read_text() == "car\ndog\ntoothbrush\n"  # category id order
    assert [(e.key, e.label) for e in read_back(out)] == [("1", 1), ("2", -1), ("3", 0)]
    assert s["labelled"] == 2
