"""Webdataset shards read in place (issue 30): the same examples as the converted ArrayRecord
shards, bitwise resume in both modes, process split, faults, the bucket, the index."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time

import fsspec
import pytest
from etils import epath

from clipjax.data import config as data_config_lib
from clipjax.data import records, train_data, train_input
from clipjax.data import webdataset as wds
from clipjax.data import webdataset_stream
from clipjax.data.convert import ConvertOptions, convert_wds
from helpers import FakeBucket, assert_same, index_of, make_tars, png

SHARDS, PER_SHARD = 5, 7  # 35 examples
SIZE = 8


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _shard(k: int, per: int = PER_SHARD) -> bytes:
    """Shard ``k``: examples ``k * per + i`` as colour-coded PNGs (``index_of`` reads them back)."""
    members = []
    for i in range(per):
        n = k * per + i
        members += [(f"{n:05d}.png", png(n, 20 + n % 5, 14 + n % 3)), (f"{n:05d}.txt", f"caption {n}".encode())]
        if n % 4 == 0:
            members.append((f"{n:05d}.cls", str(n % 3).encode()))
    return _tar_bytes(members)


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("wds")
    for k in range(SHARDS):
        (folder / f"shard-{k:03d}.tar").write_bytes(_shard(k))
    return str(folder)


def _cfg(path: str, mode: str = "random", **kw):
    c = data_config_lib.data_config()
    c.source, c.path, c.num_workers, c.prefetch = "webdataset", path, 0, 0
    c.webdataset.mode, c.webdataset.lanes, c.webdataset.shuffle_buffer = mode, 2, 6
    c.webdataset.retry_delay_s = 0.01
    for k, v in kw.items():
        c[k] = v
    return c


def _train(cfg, *, batch=4, seed=0, pi=0, pc=1) -> train_input.TrainIterator:
    return train_data.make_train_iterator(cfg, global_batch_size=batch, image_size=SIZE, context_length=16,
                                           seed=seed, process_index=pi, process_count=pc)


def _take(it, n: int) -> list[dict]:
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()


def _ids(batches) -> list[int]:
    return [int(i) for b in batches for i in index_of(b["image"])]


def test_examples_equal_the_converted_arrayrecord(tars, tmp_path):
    # The converter's hostile tars: same keys, captions and image bytes (where it kept them).
    make_tars(tmp_path)
    convert_wds([str(tmp_path)], ConvertOptions(out_dir=str(tmp_path / "ar"), max_skip_fraction=0.9))
    converted = {e.key: e for e in (records.decode(r) for r in _records(tmp_path / "ar"))}
    src = wds.WebDatasetExamples(f"{tmp_path}/0000{{0..1}}.tar")
    ours = {ex["key"]: ex for ex in (src[i] for i in range(len(src)))}
    assert set(converted) <= set(ours) and len(ours) == 8  # plus 3 that training skips (bad image, none, bad text)
    for key, e in converted.items():
        assert ours[key]["captions"] == e.captions
        assert ours[key]["image"] == e.image or key == "00001/101"  # the 16-bit PNG is re-encoded
    assert [ours[k]["captions"] for k in ("00000/00000/004", "00000/00000/005")] == [["caption without image"], []]
    # Clean tars: the train stream over the shards is bitwise the one over their conversion.
    convert_wds([tars], ConvertOptions(out_dir=str(tmp_path / "clean")))
    ar = data_config_lib.data_config()
    ar.source, ar.path, ar.num_workers, ar.prefetch = "arrayrecord", str(tmp_path / "clean"), 0, 0
    ref = _take(_train(ar), 5)
    got = _take(_train(_cfg(tars)), 5)
    assert_same(got, ref)
    assert sorted(_ids(got[:8])) != _ids(got[:8])  # shuffled


def _records(folder):
    import grain

    return list(grain.sources.ArrayRecordDataSource(records.shard_paths(str(folder), "train")))


@pytest.mark.parametrize("mode", ["random", "stream"])
def test_resume_is_bitwise_under_another_worker_count(tars, mode):
    whole = _take(_train(_cfg(tars, mode)), 12)  # 48 examples: into the second epoch
    assert sorted(_ids(whole)[:35]) == list(range(35))  # each epoch once, no duplicate
    it = _train(_cfg(tars, mode, num_workers=2, prefetch=2))
    head = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint holds
    it.close()
    if mode == "stream":  # mid-shard cursors and a full buffer, saved by keys only
        assert len(state["stream"]["buffer"]) >= 5 and any(off > 0 for _, off in state["stream"]["cursors"])
    fresh = _train(_cfg(tars, mode))
    fresh.set_state(state)
    assert_same(head + _take(fresh, 7), whole)


def test_stream_state_resumes_at_every_example(tmp_path):
    for k in range(SHARDS):  # tars without the end-of-archive blocks, which some writers leave out
        data = _shard(k)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            last = tar.getmembers()[-1]
        (tmp_path / f"{k}.tar").write_bytes(data[:last.offset_data + -(-last.size // 512) * 512])
    args = dict(paths=wds.shard_paths(str(tmp_path)), seed=1, shuffle=True, process_index=0, process_count=1, lanes=2,
                buffer_size=4, retries=0, retry_delay_s=0.0)
    whole, keys, states = webdataset_stream.ExampleStream(**args), [], []
    for _ in range(40):  # past the epoch's end
        states.append(json.loads(json.dumps(whole.state())))
        keys.append(next(whole)[4])
    whole.close()
    assert sorted(keys[:35]) == [f"{i:05d}" for i in range(35)]
    for p in range(37):  # every lane cursor, also after a shard's last example and at the epoch's end
        s = webdataset_stream.ExampleStream(**args, state=states[p])
        assert [next(s)[4] for _ in range(3)] == keys[p:p + 3], p
        assert s.state()["skipped_shards"] == [], p  # a lane reopened past its last example is not damage
        s.close()


def test_random_access_resumes_under_another_process_count(tars):
    whole = _ids(_take(_train(_cfg(tars), batch=2), 20))
    two = [_train(_cfg(tars), batch=4, pi=p, pc=2) for p in range(2)]
    seen = [_ids([next(it) for _ in range(3)]) for it in two]  # 6 examples each: global slots 0..11
    states = [it.get_state() for it in two]
    for it in two:
        it.close()
    assert sorted(seen[0] + seen[1]) == sorted(whole[:12])
    one = _train(_cfg(tars), batch=2)
    one.set_state_from_processes(states)
    assert _ids(_take(one, 8)) == whole[12:28]


@pytest.mark.parametrize("mode", ["random", "stream"])
def test_two_processes_read_disjoint_examples_that_make_the_epoch(tars, mode):
    per = [_ids(_take(_train(_cfg(tars, mode), batch=4, pi=p, pc=2), 11)) for p in range(2)]
    # random: slots p::2 of the global permutation (18 and 17); stream: whole shards (3 and 2)
    n0 = 18 if mode == "random" else 3 * PER_SHARD
    epoch = [per[0][:n0], per[1][:SHARDS * PER_SHARD - n0]]
    assert not set(epoch[0]) & set(epoch[1])
    assert sorted(epoch[0] + epoch[1]) == list(range(SHARDS * PER_SHARD))


class _SlowBucket(FakeBucket):
    """The fake bucket with a latency per request, and reads that fail once where told to."""

    latency_s = 0.002
    fail_at: dict = {}  # path -> byte position: the first read crossing it raises ConnectionError

    def _open(self, path, mode="rb", **kw):
        time.sleep(self.latency_s)
        f = super()._open(path, mode, **kw)
        at = self.fail_at.get(self._strip_protocol(path))
        if at is None or "r" not in mode:
            return f
        read = f.read

        def flaky(n=-1):
            if f.tell() <= at < f.tell() + (n if n >= 0 else 1 << 40) and self.fail_at.pop(self._strip_protocol(path), 0):
                raise ConnectionError("connection reset by peer")
            return read(n)

        f.read = flaky
        return f


@pytest.fixture
def bucket(monkeypatch, tmp_path):
    """gs://b/: 5 good shards, a truncated one, a corrupt one; shard 7 is listed but absent; a
    transient error in the middle of shard 2."""
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, _SlowBucket, clobber=True)
    monkeypatch.setattr(FakeBucket, "store", {})
    monkeypatch.setenv("CLIPJAX_DATA_DIR", str(tmp_path / "cache"))
    for k in range(SHARDS):
        epath.Path(f"gs://b/{k:02d}.tar").write_bytes(_shard(k))
    damaged = _shard(5)
    with tarfile.open(fileobj=io.BytesIO(damaged)) as tar:  # cut inside example 38's image: 35..37 stay
        cut = tar.getmember("00038.png").offset_data + 10
    epath.Path("gs://b/05.tar").write_bytes(damaged[:cut])
    epath.Path("gs://b/06.tar").write_bytes(b"\x00garbage" * 300)
    monkeypatch.setattr(_SlowBucket, "fail_at", {"b/02.tar": 10240 + 512})  # in tarfile's second read
    readable = list(range(SHARDS * PER_SHARD)) + [35, 36, 37]
    return "gs://b/{00..07}.tar", readable


@pytest.mark.parametrize("mode", ["random", "stream"])
def test_bucket_faults_are_skipped_counted_and_retried(bucket, mode, caplog):
    path, readable = bucket
    it = _train(_cfg(path, mode, max_skip_fraction=0.0), batch=1)
    got = _ids(_take(it, len(readable) + 16))[:len(readable)]  # the counter lags a task (16) at most
    assert sorted(got) == readable  # every readable example once: no duplicate, none left out
    assert it.num_skipped_shards == 3 and it.num_skipped == 0
    text = caplog.text
    assert "retry 1 of 3" in text and "05.tar" in text and "06.tar" in text and "07.tar" in text
    assert not [p for p in FakeBucket.store if p.endswith(".idx.json")]  # nothing written to the bucket


def test_index_is_built_once_and_safe_against_a_concurrent_builder(tmp_path, monkeypatch):
    folder, index_dir = tmp_path / "tars", str(tmp_path / "idx")
    folder.mkdir()
    for k in range(30):
        (folder / f"{k:02d}.tar").write_bytes(_shard(k, per=2))
    code = ("import os, sys, time; from clipjax.data import webdataset as w; open(sys.argv[3] + '/ready', 'w'); "
            "[time.sleep(0.001) for _ in iter(lambda: os.path.exists(sys.argv[3] + '/go'), True)]; "
            "w.load_indexes(w.shard_paths(sys.argv[1]), sys.argv[2], 0, 0.0, threads=1)")
    other = subprocess.Popen([sys.executable, "-c", code, str(folder), index_dir, str(tmp_path)])
    while not (tmp_path / "ready").exists():
        time.sleep(0.01)
    (tmp_path / "go").touch()  # both build all 30 indexes at once now
    first = wds.WebDatasetExamples(str(folder), index_dir=index_dir)
    assert other.wait(timeout=120) == 0
    files = sorted(os.listdir(index_dir))
    assert len(files) == 30 and all(f.endswith(".tar.idx.json") for f in files)  # whole files, no temporary
    assert not [f for f in os.listdir(folder) if "idx" in f]  # index_dir given: nothing beside the shards
    for path in wds.shard_paths(str(folder)):
        saved = json.loads(epath.Path(wds.index_path(path, index_dir)).read_text())
        assert saved == wds.build_index(path, 0, 0.0)

    built = []
    monkeypatch.setattr(wds, "load_or_build_index", lambda shard, *a: built.append(shard) or first_index)
    first_index = {"starts": [], "ends": [], "damaged": ""}
    paths = wds.shard_paths(str(folder))
    wds.load_indexes(paths, index_dir, 0, 0.0, threads=1, process=(2, 3))
    assert built == paths[2::3] + paths[0::3] + paths[1::3]  # a pod's host builds its own share first
    monkeypatch.undo()

    def no_rebuild(*a, **k):
        raise AssertionError("index rebuilt")

    monkeypatch.setattr(wds, "build_index", no_rebuild)
    again = wds.WebDatasetExamples(str(folder), index_dir=index_dir)
    assert [again.address(i) for i in range(len(again))] == [first.address(i) for i in range(len(first))]
    assert len(again) == 60 and again[9]["captions"] == ["caption 9"] and again[8]["label"] == 2


def test_paths_and_config_errors(tars):
    assert wds._expand_braces("gs://b/{000..002}.tar") == ["gs://b/000.tar", "gs://b/001.tar", "gs://b/002.tar"]
    listed = wds.shard_paths(f"{tars}/shard-00{{0..1}}.tar :: {tars}/shard-00[34].tar")
    assert [os.path.basename(p) for p in listed] == ["shard-000.tar", "shard-001.tar", "shard-003.tar", "shard-004.tar"]
    assert wds.shard_paths(tars) == wds.shard_paths(f"{tars}/*.tar")
    with pytest.raises(ValueError, match=r"config\.data\.webdataset\.mode: 'fast'"):
        data_config_lib.validate_data_config(_cfg(tars, "fast"))
    with pytest.raises(wds.WebDatasetError, match="compressed shards cannot be read at random"):
        wds.build_index(_gz(tars), 0, 0.0)
    with pytest.raises(train_input.DataError, match="same process count"):
        it = _train(_cfg(tars, "stream"))
        it.set_state_from_processes([{"position": 0, "num_skipped": 0}] * 2)


def _gz(folder: str) -> str:
    import gzip

    path = os.path.join(folder, "..", "one.tar.gz")
    with open(os.path.join(folder, "shard-000.tar"), "rb") as f, gzip.open(path, "wb") as g:
        g.write(f.read())
    return path


@pytest.mark.parametrize("mode", ["random", "stream"])
def test_killed_run_resumes_to_the_uninterrupted_losses(tars, tmp_path, mode):
    import pathlib

    from clipjax.config import load_config
    from clipjax.evals.config import evals_config
    from clipjax.report import read_metrics
    from clipjax.train import _default_data_iterator, train

    demo = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py"
    c = load_config(f"{demo}:smoke,data={tmp_path / 'unused'}",
                    ["--config.data.source=webdataset", f"--config.data.path={tars}",
                     f"--config.data.webdataset.mode={mode}", "--config.data.webdataset.lanes=2",
                     "--config.data.webdataset.shuffle_buffer=8", "--config.data.num_workers=0",
                     "--config.train.steps=5", "--config.train.batch_size=16", "--config.checkpoint.every=2",
                     "--config.checkpoint.async_save=false"])
    c.evals = evals_config()  # no evaluations: they would read the synthetic set

    class Killed:
        """The real stream, dying at its 4th batch (after the checkpoint of step 2)."""

        def __init__(self, config, mesh):
            self.inner, self.n = _default_data_iterator(config, mesh), 0

        def __next__(self):
            self.n += 1
            if self.n == 4:
                raise KeyboardInterrupt("killed")
            return next(self.inner)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    train(c, str(tmp_path / "ref"))
    with pytest.raises(KeyboardInterrupt):
        train(c, str(tmp_path / "run"), data_iterator_fn=Killed)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]  # died unsaved after step 3
    train(c, str(tmp_path / "run"))  # resumes from step 2

    def losses(run):
        rows = read_metrics(str(tmp_path / run / "metrics.jsonl"))
        assert all(r.get("data/skipped_shards", 0) == 0 for r in rows) and "data/skipped_shards" in rows[-1]
        return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}

    ref, run = losses("ref"), losses("run")
    assert sorted(ref) == [1, 2, 3, 4, 5] and {s: run[s] for s in ref} == ref  # bitwise on CPU
