"""The Beam runner writes exactly what the single-process converter writes, and a failed Beam run
leaves no partial shard (issue 14)."""

import os

import fsspec
import grain
import numpy as np
import pytest
from etils import epath

from clipjax.data import records
from clipjax.data.config import data_config
from clipjax.data.convert import ConvertError, ConvertOptions, convert_csv, convert_wds
from clipjax.data.train_input import make_train_iterator
from helpers import FakeBucket, make_csv_dataset, make_tars

pytestmark = pytest.mark.slow  # each Beam pipeline takes seconds to start


def shards_of(paths):
    return [records.decode(r) for r in grain.sources.ArrayRecordDataSource([str(p) for p in paths])]


def shards(out, split="train"):
    """{shard file name: [records]}: records, keys and their assignment to shards."""
    return {os.path.basename(p): shards_of([p]) for p in records.shard_paths(str(out), split)}


def leftovers(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if ".tmp" in p.name or ".plan" in str(p))


COUNTS = ("written", "skipped", "skipped_total", "reencoded", "captions_truncated", "captions_dropped", "shards")


def test_direct_runner_two_workers_equals_single_process(tmp_path, capsys):
    # Two tars: good images (some re-encoded), a truncated image, a caption that is not UTF-8, a
    # member without image, and unsafe members (../, absolute, a symlink).
    make_tars(tmp_path)
    opts = dict(max_skip_fraction=0.8)
    local = convert_wds([str(tmp_path)], ConvertOptions(out_dir=str(tmp_path / "local"), **opts))
    beam = convert_wds([str(tmp_path)], ConvertOptions(out_dir=str(tmp_path / "beam"), **opts),
                       runner="DirectRunner", beam_args=["--direct_num_workers=2"])
    assert beam["runner"] == "DirectRunner" and beam["shards_resumed"] == 0
    assert {k: beam[k] for k in COUNTS} == {k: local[k] for k in COUNTS}
    assert local["skipped"] == {"bad_image": 1, "missing_image": 1, "bad_caption": 1, "unsafe_member": 4}
    assert shards(tmp_path / "beam") == shards(tmp_path / "local")  # records, keys, shard assignment
    assert leftovers(tmp_path / "beam") == []
    assert "metrics" not in capsys.readouterr().err  # Beam's counters agree with the shards' statistics
    assert beam["beam_metrics"] == {"captions_dropped": 0, "captions_truncated": 0, "labelled": 0, "reencoded": 1,
                                    "skipped/bad_caption": 1, "skipped/bad_image": 1, "skipped/missing_image": 1,
                                    "skipped/unsafe_member": 4, "written": 5}

    # the Beam output feeds the training pipeline
    cfg = data_config()
    cfg.source, cfg.path, cfg.num_workers = "arrayrecord", str(tmp_path / "beam"), 0
    it = make_train_iterator(cfg, global_batch_size=4, image_size=16, context_length=16, seed=0,
                             process_index=0, process_count=1)
    try:
        batches = [next(it) for _ in range(3)]  # 5 records: the stream wraps into a second epoch
        skipped = it.num_skipped
    finally:
        it.close()
    assert all(b["text"].shape == (4, 16) for b in batches) and skipped == 0
    assert all(np.asarray(b["image_hw"]).min() > 0 for b in batches)


def test_failed_beam_run_leaves_no_partial_shard_and_resumes(tmp_path, monkeypatch):
    csv_path = make_csv_dataset(tmp_path)
    kw = dict(examples_per_shard=4, max_skip_fraction=0.8)
    ref = convert_csv(str(csv_path), ConvertOptions(out_dir=str(tmp_path / "ref"), **kw))
    out = tmp_path / "out"
    from clipjax.data.convert import example

    real = example.prepare

    def crash_on_l(data, *a, **k):  # a worker dies half way through shard 2 (l.jpg is its 3rd input)
        if data == (tmp_path / "imgs" / "l.jpg").read_bytes():
            raise RuntimeError("worker lost")
        return real(data, *a, **k)

    monkeypatch.setattr(example, "prepare", crash_on_l)
    with pytest.raises(ConvertError, match="DirectRunner pipeline failed .*worker lost.*rerun the same command"):
        convert_csv(str(csv_path), ConvertOptions(out_dir=str(out), **kw), runner="DirectRunner")
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    done = shards(out) if list(out.glob("train-*.array_record")) else {}
    assert records.shard_name("train", 2, 4) not in done
    want = shards(tmp_path / "ref")
    assert all(done[name] == want[name] for name in done)  # whatever has a final name is whole

    monkeypatch.setattr(example, "prepare", real)
    (out / (records.shard_name("train", 2, 4) + ".tmp.999")).write_bytes(b"left by a killed worker")
    s = convert_csv(str(csv_path), ConvertOptions(out_dir=str(out), **kw), runner="DirectRunner")
    assert s["shards_resumed"] == len(done) and {k: s[k] for k in COUNTS} == {k: ref[k] for k in COUNTS}
    assert shards(out) == want and leftovers(out) == []


def test_bucket_paths_in_and_out(tmp_path, monkeypatch):
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeBucket, clobber=True)
    monkeypatch.setattr(FakeBucket, "store", {})
    make_tars(tmp_path)
    for p in tmp_path.glob("*.tar"):
        epath.Path(f"gs://bucket/tars/{p.name}").write_bytes(p.read_bytes())
    local = convert_wds([str(tmp_path)], ConvertOptions(out_dir=str(tmp_path / "local"), max_skip_fraction=0.9))
    want = shards(tmp_path / "local")
    for runner in (None, "DirectRunner"):  # in this process: the fake bucket is only here
        out = f"gs://bucket/out_{runner}"
        s = convert_wds(["gs://bucket/tars/*.tar"], ConvertOptions(out_dir=out, max_skip_fraction=0.9), runner=runner)
        assert {k: s[k] for k in COUNTS} == {k: local[k] for k in COUNTS}
        names = sorted(p.name for p in epath.Path(out).iterdir())
        assert names == sorted([*want, "_stats", "train-summary.json"])
        for name in want:  # copy back to read: ArrayRecord reads local files
            (tmp_path / name).write_bytes(epath.Path(f"{out}/{name}").read_bytes())
            assert shards_of([tmp_path / name]) == want[name]
