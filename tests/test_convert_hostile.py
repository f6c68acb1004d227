"""Conversion is idempotent and honest (issue 12 item 5): fingerprinted output, malformed metadata
named, empty inputs refused, duplicate and oversized tar members counted, a skipped-input report."""

import json
import tarfile
import tracemalloc

import pytest

from clipjax.data.cli import main as cli_main
from clipjax.data.convert import ConvertError, ConvertOptions, convert_coco, convert_csv, convert_wds
from helpers import add_member, make_csv_dataset, read_back, sample_images


def _csv(root, body: bytes, name="d.csv"):
    (root / "x.jpg").write_bytes(sample_images()["jpeg"])
    (root / "y.jpg").write_bytes(sample_images()["png"])
    (root / name).write_bytes(body)
    return str(root / name)


def test_rerun_with_changed_input_or_options_refuses_or_overwrites(tmp_path, capsys, monkeypatch):
    path = _csv(tmp_path, b"filepath,title\nx.jpg,first\n")
    out = str(tmp_path / "out")
    args = ["convert", "csv", "--csv", path, "--out", out]
    assert cli_main(args) == 0 and json.loads(capsys.readouterr().out)["shards_resumed"] == 0
    assert cli_main(args) == 0 and json.loads(capsys.readouterr().out)["shards_resumed"] == 1  # same: resumed
    monkeypatch.chdir(tmp_path)  # the same file named by a relative path is the same input
    assert cli_main(["convert", "csv", "--csv", "d.csv", "--out", out]) == 0
    assert json.loads(capsys.readouterr().out)["shards_resumed"] == 1
    _csv(tmp_path, b"filepath,title\nx.jpg,first\ny.jpg,second\n")  # the input changes
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "changed: inputs.sha256" in err and "--overwrite" in err and err.count("\n") == 1
    assert cli_main(args + ["--max_side", "32"]) == 2  # so do the options
    assert "options.max_side" in capsys.readouterr().err
    assert cli_main(args + ["--overwrite"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["shards_resumed"] == 0 and s["written"] == 2
    assert [e.captions for e in read_back(out)] == [["first"], ["second"]]


def test_csv_unterminated_quote_is_reported(tmp_path):
    path = _csv(tmp_path, b'filepath,title\nx.jpg,fine\ny.jpg,"never closed\nx.jpg,swallowed\nx.jpg,too\n')
    with pytest.raises(ConvertError, match="unterminated quote in the row starting at line 3 .* remaining 3 lines"):
        convert_csv(path, ConvertOptions(out_dir=str(tmp_path / "o")))


def test_csv_byte_order_mark_is_accepted(tmp_path):
    path = _csv(tmp_path, b"\xef\xbb\xbffilepath,title\nx.jpg,with bom\n")
    s = convert_csv(path, ConvertOptions(out_dir=str(tmp_path / "o")))
    assert s["written"] == 1 and read_back(tmp_path / "o")[0].captions == ["with bom"]


def test_empty_inputs_are_errors(tmp_path):
    with pytest.raises(ConvertError, match="d.csv: no rows after the header"):
        convert_csv(_csv(tmp_path, b"filepath,title\n"), ConvertOptions(out_dir=str(tmp_path / "o")))
    (tmp_path / "c.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ConvertError, match="c.json: 'images' is empty"):
        convert_coco(str(tmp_path / "c.json"), str(tmp_path), ConvertOptions(out_dir=str(tmp_path / "o")))


@pytest.mark.parametrize("meta, message", [
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [', r"c.json: not valid JSON \(Expecting value"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}, {"file_name": "b.jpg"}], "annotations": []},
     r"c.json: images\[1\] has no \['id'\]"),
    ({"images": [{"id": 1}], "annotations": []}, r"c.json: images\[0\] has no \['file_name'\]"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"caption": "x"}]},
     r"c.json: annotations\[0\] has no \['image_id'\]"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": "x"}, {"image_id": 1}]},
     r"c.json: annotations\[1\] has no \['caption'\]"),
    ({"images": [{"id": 1, "file_name": "../secret.jpg"}], "annotations": []},
     r"c.json: images\[0\] has file_name '../secret.jpg', which points outside --images"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "/etc/hostname"}], "annotations": []},
     r"c.json: images\[1\] has file_name '/etc/hostname', which points outside --images"),
])
def test_coco_malformed_entries_are_named(tmp_path, meta, message):
    (tmp_path / "c.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    with pytest.raises(ConvertError, match=message):
        convert_coco(str(tmp_path / "c.json"), str(tmp_path), ConvertOptions(out_dir=str(tmp_path / "o")))


def test_tar_duplicate_keys_are_counted(tmp_path):
    jpeg = sample_images()["jpeg"]
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        add_member(tar, "a.jpg", jpeg), add_member(tar, "a.txt", b"first a")
        add_member(tar, "b.jpg", jpeg), add_member(tar, "b.txt", b"b")
        add_member(tar, "a.jpg", jpeg), add_member(tar, "a.txt", b"a again, later")  # key a seen before
        add_member(tar, "c.jpg", jpeg), add_member(tar, "c.jpg", jpeg), add_member(tar, "c.txt", b"c")  # c.jpg twice in a row
    s = convert_wds([str(tmp_path / "t.tar")], ConvertOptions(out_dir=str(tmp_path / "o"), max_skip_fraction=1))
    assert s["skipped"] == {"duplicate_key": 2, "no_caption": 1}
    assert [(e.key, e.captions) for e in read_back(tmp_path / "o")] == [("t/a", ["first a"]), ("t/b", ["b"])]


def test_oversized_inputs_are_skipped_unread(tmp_path):
    big = 32 * 2**20
    with tarfile.open(tmp_path / "t.tar.gz", "w:gz") as tar:  # ~32 KiB on disk
        add_member(tar, "a.jpg", sample_images()["jpeg"]), add_member(tar, "a.txt", b"\0" * big)
        add_member(tar, "b.jpg", sample_images()["jpeg"]), add_member(tar, "b.txt", b"fine")
    opts = ConvertOptions(out_dir=str(tmp_path / "o"), max_input_bytes=2**20, max_skip_fraction=1)
    tracemalloc.start()
    try:
        s = convert_wds([str(tmp_path / "t.tar.gz")], opts)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert s["skipped"] == {"too_large": 1} and s["written"] == 1
    assert peak < big // 4  # the 32 MiB member never came into memory
    # an image file over the cap, named by a CSV
    (tmp_path / "huge.jpg").write_bytes(sample_images()["jpeg"] + b"\0" * 2**20)
    path = _csv(tmp_path, b"filepath,title\nx.jpg,ok\nhuge.jpg,too big\n")
    s = convert_csv(path, ConvertOptions(out_dir=str(tmp_path / "o2"), max_input_bytes=2**20, max_skip_fraction=1))
    assert s["skipped"] == {"too_large": 1} and s["written"] == 1


def test_skipped_report_lists_inputs_and_reasons(tmp_path):
    csv_path = make_csv_dataset(tmp_path)
    report = tmp_path / "skipped.jsonl"
    rc = cli_main(["convert", "csv", "--csv", str(csv_path), "--out", str(tmp_path / "o"), "--examples_per_shard", "4",
                   "--max_skip_fraction", "0.5", "--skipped_report", str(report)])
    assert rc == 0
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    got = sorted((r["key"].split("/")[-1], r["reason"]) for r in rows)
    assert got == [("k.jpg", "no_caption"), ("m.jpg", "missing_image"), ("n.jpg", "bad_caption"),
                   ("r.jpg", "bad_image"), ("t.jpg", "bad_image"), ("z.jpg", "bad_image")]
    assert all(r["input"].endswith(r["key"].split("/")[-1]) for r in rows)
    assert next(r for r in rows if r["key"].endswith("z.jpg"))["detail"] == "empty image bytes"
