"""`clipjax-bench data`: input pipeline images/s against a plain Pillow decode.

Writes ArrayRecord shards of procedurally textured JPEGs (photo-like sizes),
then times on the same files in one run:

* Pillow full-size decode, ``Image.open(...).convert("RGB")`` (one core),
* the host pipeline (read + decode + random crop box + cut out its pixels +
  tokenize + batch; resizing and normalising run on the accelerator, see
  ``clipjax/data/resize.py``) with 0 workers (one core), and without JPEG draft mode,
* the same with N grain worker processes;
* with ``--source=webdataset``, the same JPEGs in webdataset tars: random access (0 and N
  workers; its per-core figure against the ArrayRecord row's) and streaming from a
  simulated slow bucket (``--latency_ms`` a request) with N preparing threads.
* the NaFlex host pipeline (``clipjax/data/naflex.py``: the whole image at its aspect
  ratio, resized on the host to at most ``--naflex_len`` patches and patchified) with
  0 workers, draft decode: its per-core cost against the fixed-resolution row.

Rows are measured in interleaved rounds and each reports its best round. Single-core
rows also report CPU time per image (``time.process_time``), the per-core comparison
that load from other jobs on a shared machine does not distort.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
import time

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractBufferedFile
from PIL import Image

from clipjax.data import records
from clipjax.errors import ArgumentParser


def photo_like_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
    """A JPEG with smooth colour regions, edges and grain, so its size resembles a photo's."""
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    mid = Image.fromarray(rng.integers(0, 256, (height // 12, width // 12, 3), dtype=np.uint8)).resize(
        (width, height), Image.BILINEAR)
    arr = 0.6 * np.asarray(base, np.float32) + 0.4 * np.asarray(mid, np.float32)
    for _ in range(int(rng.integers(4, 10))):  # a few hard-edged objects
        x0, y0 = rng.integers(0, width - 20), rng.integers(0, height - 20)
        x1, y1 = x0 + rng.integers(20, width // 2), y0 + rng.integers(20, height // 2)
        arr[y0:y1, x0:x1] = 0.5 * arr[y0:y1, x0:x1] + 0.5 * rng.integers(0, 256, 3)
    arr += rng.normal(0, 8, arr.shape)  # sensor grain
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def add_source_flags(p: ArgumentParser, num_images: int) -> None:
    """The flags describing the source JPEGs (``photo_like_jpeg``) a suite writes."""
    p.add_argument("--num_images", type=int, default=num_images)
    p.add_argument("--width", type=int, default=500, help="source JPEG size (a third are portrait)")
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the source images")


def _caption(i: int) -> str:
    return f"a photo of object number {i} on a table"


def write_shards(folder: str, num_images: int, width: int = 500, height: int = 375, seed: int = 0,
                 quality: int = 90) -> list[bytes]:
    rng = np.random.default_rng(seed)
    jpegs = []
    num_shards = 4
    for k in range(num_shards):
        with records.ShardWriter(os.path.join(folder, records.shard_name("train", k, num_shards))) as w:
            for i in range(k * num_images // num_shards, (k + 1) * num_images // num_shards):
                w_, h_ = (width, height) if i % 3 else (height, width)  # mostly landscape, some portrait
                jpeg = photo_like_jpeg(rng, w_, h_, quality)
                jpegs.append(jpeg)
                w.write(records.Example(f"img{i}", jpeg, [_caption(i)], -1))
    return jpegs


def write_tars(folder: str, jpegs: list[bytes], num_shards: int = 4) -> str:
    """The same examples, in the same order, as webdataset tars; their brace pattern."""
    n = len(jpegs)
    for k in range(num_shards):
        with tarfile.open(os.path.join(folder, f"train-{k:05d}.tar"), "w") as tar:
            for i in range(k * n // num_shards, (k + 1) * n // num_shards):
                for ext, data in (("jpg", jpegs[i]), ("txt", _caption(i).encode())):
                    info = tarfile.TarInfo(f"img{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(folder, f"train-{{00000..{num_shards - 1:05d}}}.tar")


class SlowBucket(LocalFileSystem):
    """Local files served like a bucket: every request (a ranged read, or a read-ahead block of
    a sequential read) waits ``latency_s`` first. URLs: ``slowbucket:///abs/path``."""

    protocol = ("slowbucket",)
    latency_s = 0.0

    @classmethod
    def _strip_protocol(cls, path):
        return str(path).split("://", 1)[-1]

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        return _SlowFile(self, self._strip_protocol(path), mode, block_size=block_size or 4 << 20,
                         cache_type="readahead")

    def cat_file(self, path, start=None, end=None, **kwargs):
        time.sleep(self.latency_s)
        return super().cat_file(self._strip_protocol(path), start=start, end=end, **kwargs)


class _SlowFile(AbstractBufferedFile):
    def _fetch_range(self, start: int, end: int) -> bytes:
        time.sleep(self.fs.latency_s)
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(end - start)


def time_raw_decode(jpegs: list[bytes], passes: int) -> tuple[float, float]:
    """(images/s, CPU ms an image) of a full-size Pillow decode to RGB."""
    t, c = time.perf_counter(), time.process_time()
    for _ in range(passes):
        for data in jpegs:
            Image.open(io.BytesIO(data)).convert("RGB")
    n = passes * len(jpegs)
    return n / (time.perf_counter() - t), 1e3 * (time.process_time() - c) / n


def time_pipeline(folder: str, *, workers: int, draft: bool, image_size: int, batch: int, num_images: int,
                  tokenizer: str, passes: int, source: str = "arrayrecord", mode: str = "random",
                  seq_len: int = 0, patch_size: int = 16) -> tuple[float, float]:
    """(images/s, CPU ms an image of this process) of the train pipeline over ``passes``
    epochs, after one warm-up batch. With 0 workers the CPU time is all the work.
    ``source=webdataset``: ``folder`` is the tars' pattern, read in ``mode``."""
    from clipjax.data import config, train_data

    cfg = config.data_config()
    cfg.source, cfg.path, cfg.num_workers, cfg.draft_decode, cfg.tokenizer = source, folder, workers, draft, tokenizer
    cfg.webdataset.mode = mode
    cfg.prefetch = 0 if workers == 0 else 2  # 0 workers: everything on this one core
    it = train_data.make_train_iterator(cfg, global_batch_size=batch, image_size=image_size, context_length=77,
                                        seed=0, process_index=0, process_count=1, seq_len=seq_len,
                                        patch_size=patch_size)
    try:
        next(it)  # worker start-up is not throughput
        n = max(1, passes * num_images // batch)
        t, c = time.perf_counter(), time.process_time()
        for _ in range(n):
            b = next(it)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        assert b["text"].shape[0] == batch
    finally:
        it.close()
    return n * batch / dt, 1e3 * dc / (n * batch)


def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="clipjax-bench data", doc=__doc__)
    add_source_flags(p, num_images=300)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="N for the multi-worker row")
    p.add_argument("--passes", type=int, default=2, help="epochs timed per measurement")
    p.add_argument("--naflex_len", type=int, default=256, help="patch budget of the NaFlex row (0: no such row)")
    p.add_argument("--patch_size", type=int, default=16, help="patch size of the NaFlex row")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats; each row reports its best")
    p.add_argument("--tokenizer", default="bytes", choices=("bytes", "clip"))
    p.add_argument("--dir", default="", help="where to write the shards (default: a temporary folder)")
    p.add_argument("--source", default="arrayrecord", choices=("arrayrecord", "webdataset"),
                   help="webdataset: add the rows of the same JPEGs in tars, read at random and streamed")
    p.add_argument("--latency_ms", type=float, default=50.0, help="the slow bucket's wait per request (streaming row)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    from clipjax.bench.table import emit

    with tempfile.TemporaryDirectory() as tmp:
        folder = a.dir or tmp
        jpegs = write_shards(folder, a.num_images, a.width, a.height, quality=a.quality)
        kb = np.mean([len(j) for j in jpegs]) / 1024
        common = dict(image_size=a.image_size, batch=a.batch, num_images=a.num_images, tokenizer=a.tokenizer,
                      passes=a.passes)
        cases = [("pillow full decode (convert RGB)", 0, None, {}), ("pipeline, draft decode", 0, True, {}),
                 ("pipeline, full decode", 0, False, {}), ("pipeline, draft decode", a.workers, True, {})]
        if a.source == "webdataset":
            tars = write_tars(folder, jpegs)
            fsspec.register_implementation("slowbucket", SlowBucket, clobber=True)
            SlowBucket.latency_s = a.latency_ms / 1e3
            random_access = dict(source="webdataset", folder=tars)
            cases += [("webdataset random access, draft decode", 0, True, random_access),
                      ("webdataset random access, draft decode", a.workers, True, random_access),
                      (f"webdataset stream, bucket +{a.latency_ms:g} ms a request", a.workers, True,
                       dict(source="webdataset", mode="stream", folder="slowbucket://" + os.path.abspath(tars)))]
        if a.naflex_len:
            cases.append((f"NaFlex pipeline ({a.naflex_len} patches of {a.patch_size}), draft decode", 0, True,
                          dict(seq_len=a.naflex_len, patch_size=a.patch_size)))
        best_ips, best_cpu = [0.0] * len(cases), [float("inf")] * len(cases)
        for _ in range(a.rounds):  # interleaved, so drifting machine load hits every row alike
            for i, (_, workers, draft, where) in enumerate(cases):
                ips, cpu = (time_raw_decode(jpegs, a.passes) if draft is None
                            else time_pipeline(**{"folder": folder, **where}, workers=workers, draft=draft, **common))
                best_ips[i], best_cpu[i] = max(best_ips[i], ips), min(best_cpu[i], cpu)
        rows = []
        for (name, workers, _, _), ips, cpu in zip(cases, best_ips, best_cpu):
            row = {"case": name, "workers": workers, "images_per_s": ips, "vs_raw": ips / best_ips[0]}
            if workers == 0:  # one core does everything: compare CPU time, which other jobs do not inflate
                row.update(cpu_ms_per_image=cpu, per_core_vs_raw=best_cpu[0] / cpu)
            rows.append(row)
        for r in rows:
            r.update(jpeg_kb=round(float(kb), 1), size=f"{a.width}x{a.height}q{a.quality}->{a.image_size}")
        rows[3]["vs_0_workers"] = rows[3]["images_per_s"] / rows[1]["images_per_s"]
        if a.source == "webdataset":  # per core (CPU time), and with workers, against the ArrayRecord rows
            rows[4]["per_core_vs_arrayrecord"] = best_cpu[1] / best_cpu[4]
            for r in rows[5:]:
                r["vs_arrayrecord"] = r["images_per_s"] / rows[3]["images_per_s"]
        if a.naflex_len:  # per core against the fixed-resolution pipeline (same decode, same draft)
            rows[-1]["per_core_vs_fixed"] = best_cpu[1] / best_cpu[-1]
    emit(rows, a.json)
    if not a.json:
        from clipjax.bench.table import cpu_model

        print(f"cpu: {cpu_model()}")  # per-core figures hold for this CPU only
    return 0
