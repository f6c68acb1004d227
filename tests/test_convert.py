"""Converters: real bad files in tmp dirs, exact summary counts, records read back via grain, resume."""

import json
import os
import shutil

import pytest

from clipjax.data import records
from clipjax.data.cli import main as cli_main
from clipjax.data.convert import ConvertError, ConvertOptions, convert_coco, convert_csv, convert_wds, is_unsafe_member
from clipjax.data.images import load_rgb
from helpers import make_csv_dataset, make_tars, read_back, sample_images


CSV_SKIPPED = {"bad_image": 3, "missing_image": 1, "no_caption": 1, "bad_caption": 1}


def test_csv_counts_and_records(tmp_path):
    csv_path = make_csv_dataset(tmp_path)
    out = tmp_path / "out"
    opts = ConvertOptions(out_dir=str(out), examples_per_shard=4, max_skip_fraction=0.5, max_caption_chars=1000)
    s = convert_csv(str(csv_path), opts)
    assert s["written"] == 9 and s["skipped"] == CSV_SKIPPED and s["skipped_total"] == 6
    assert s["reencoded"] == 4 and s["captions_truncated"] == 1 and s["shards"] == 4 and s["ok"]
    assert json.loads((out / "train-summary.json").read_text())["written"] == 9
    exs = read_back(out)
    by_key = {e.key.split("/")[-1][0]: e for e in exs}
    assert sorted(by_key) == list("abcdefghl")
    assert by_key["a"].captions == ["caption of a", "second caption, with comma"]
    assert by_key["b"].image == sample_images()["png"]  # kept byte for byte
    assert len(by_key["l"].captions[0]) <= 1000
    for e in exs:
        assert load_rgb(e.image).size == (64, 48) and e.label == -1
    assert not list(out.glob("*.tmp*"))


def test_csv_tsv_and_column_flags(tmp_path):
    (tmp_path / "x.png").write_bytes(sample_images()["png"])
    (tmp_path / "d.tsv").write_text("img\tcap\nx.png\ta, b\n")
    s = convert_csv(str(tmp_path / "d.tsv"), ConvertOptions(out_dir=str(tmp_path / "o")), img_key="img",
                    caption_key="cap")
    assert s["written"] == 1 and read_back(tmp_path / "o")[0].captions == ["a, b"]
    with pytest.raises(ConvertError, match="no column"):
        convert_csv(str(tmp_path / "d.tsv"), ConvertOptions(out_dir=str(tmp_path / "o2")))


def test_resume_after_interruption(tmp_path):
    csv_path = make_csv_dataset(tmp_path)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    kw = dict(examples_per_shard=4, max_skip_fraction=0.5)
    ref = convert_csv(str(csv_path), ConvertOptions(out_dir=str(full), **kw))
    # An interrupted run: shards 0 and 2 finished, shard 1 left a stale .tmp, shard 3 never started.
    (resumed / "_stats").mkdir(parents=True)
    for i in (0, 2):
        name = records.shard_name("train", i, 4)
        shutil.copy2(full / name, resumed / name)
        shutil.copy2(full / "_stats" / (name + ".json"), resumed / "_stats" / (name + ".json"))
    shutil.copy2(full / "_stats" / "train.fingerprint.json", resumed / "_stats" / "train.fingerprint.json")
    (resumed / (records.shard_name("train", 1, 4) + ".tmp.123")).write_bytes(b"half a shard")
    before = {i: os.stat(resumed / records.shard_name("train", i, 4)).st_mtime_ns for i in (0, 2)}
    s = convert_csv(str(csv_path), ConvertOptions(out_dir=str(resumed), workers=2, **kw))
    assert s["shards_resumed"] == 2
    assert {k: s[k] for k in ("written", "skipped", "reencoded")} == {k: ref[k] for k in ("written", "skipped", "reencoded")}
    for i in (0, 2):  # finished shards are not rewritten
        assert os.stat(resumed / records.shard_name("train", i, 4)).st_mtime_ns == before[i]
    assert read_back(full) == read_back(resumed)
    assert not list(resumed.glob("*.tmp*"))
    # a different layout in the same folder is refused
    with pytest.raises(ConvertError, match="changed: source_options.examples_per_shard"):
        convert_csv(str(csv_path), ConvertOptions(out_dir=str(resumed), examples_per_shard=5, max_skip_fraction=0.5))


def test_coco(tmp_path):
    imgs = tmp_path / "images"
    imgs.mkdir()
    for i, kind in ((1, "jpeg"), (2, "rgba"), (3, "png")):
        (imgs / f"{i:012d}.jpg").write_bytes(sample_images()[kind])
    meta = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (3, 1, 2, 4)],
            "annotations": [{"image_id": 1, "caption": f"cap {k}"} for k in range(5)]
            + [{"image_id": 2, "caption": "only one"}, {"image_id": 4, "caption": "no file"},
               {"image_id": 99, "caption": "orphan"}]}
    (tmp_path / "captions.json").write_text(json.dumps(meta))
    s = convert_coco(str(tmp_path / "captions.json"), str(imgs),
                     ConvertOptions(out_dir=str(tmp_path / "out"), max_skip_fraction=0.6))
    assert s["written"] == 2 and s["skipped"] == {"no_caption": 1, "missing_image": 1} and s["reencoded"] == 1
    exs = read_back(tmp_path / "out")
    assert [(e.key, len(e.captions)) for e in exs] == [("1", 5), ("2", 1)]


def test_wds(tmp_path):
    make_tars(tmp_path)
    out = tmp_path / "out"
    s = convert_wds([str(tmp_path)], ConvertOptions(out_dir=str(out), split="val", workers=2, max_skip_fraction=0.8))
    assert s["written"] == 5 and s["shards"] == 2 and s["reencoded"] == 1
    assert s["skipped"] == {"bad_image": 1, "missing_image": 1, "bad_caption": 1, "unsafe_member": 4}
    exs = read_back(out, "val")
    assert [(e.key, e.captions) for e in exs] == [
        ("00000/00000/000", ["a red thing"]), ("00000/00000/001", ["from json"]), ("00000/00000/002", ["txt wins"]),
        ("00001/100", ["gray"]), ("00001/101", ["sixteen bit"])]
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path.parent / "escape.txt").exists()


def test_unsafe_member_names():
    for name in ("../a.jpg", "/a.jpg", "a/../../b", "a/../b", "C:\\x.jpg", "..\\x", "", "a\x00b"):
        assert is_unsafe_member(name), name
    for name in ("a.jpg", "0000/0001.jpg", "./a.jpg", "a..b.jpg"):
        assert not is_unsafe_member(name), name


def test_cli_fails_on_too_many_skips(tmp_path, capsys):
    csv_path = make_csv_dataset(tmp_path)
    out = tmp_path / "out"
    rc = cli_main(["convert", "csv", "--csv", str(csv_path), "--out", str(out), "--examples_per_shard", "8"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "max_skip_fraction" in err and "40.0%" in err
    summary = json.loads((out / "train-summary.json").read_text())
    assert summary["ok"] is False and summary["skipped"] == CSV_SKIPPED
    rc = cli_main(["convert", "csv", "--csv", str(csv_path), "--out", str(out), "--examples_per_shard", "8",
                   "--max_skip_fraction", "0.5"])
    assert rc == 0 and json.loads((out / "train-summary.json").read_text())["shards_resumed"] == 2
