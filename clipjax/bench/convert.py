"""`clipjax-bench convert`: conversion images/s, single process against Beam's DirectRunner.

Writes WebDataset tars of procedurally textured JPEGs (``bench.data.photo_like_jpeg``),
then converts the same tars in one run, in interleaved rounds, into fresh folders:

* the single-process converter (``clipjax-data convert wds``, ``--workers=1``),
* the same conversion as a Beam pipeline on DirectRunner with N worker processes
  (``--runner=DirectRunner --direct_num_workers=N``).

Each row reports its best round: wall time including start-up (DirectRunner starts its
worker processes for every pipeline) and CPU time per image of this process and its
worker processes (which load from other jobs does not inflate). The last column checks
that both wrote the same shards, byte for byte.
"""

from __future__ import annotations

import io
import os
import resource
import shutil
import tarfile
import tempfile
import time

import numpy as np

from clipjax.bench.data import add_source_flags, photo_like_jpeg
from clipjax.errors import ArgumentParser


def write_tars(folder: str, num_images: int, num_tars: int, width: int, height: int, quality: int) -> float:
    """img2dataset-style tars (``KEY.jpg`` + ``KEY.txt``); returns the mean JPEG size in KiB."""
    rng = np.random.default_rng(0)
    sizes = []
    for t in range(num_tars):
        with tarfile.open(os.path.join(folder, f"{t:05d}.tar"), "w") as tar:
            for i in range(t * num_images // num_tars, (t + 1) * num_images // num_tars):
                w, h = (width, height) if i % 3 else (height, width)
                for name, data in ((f"{i:09d}.jpg", photo_like_jpeg(rng, w, h, quality)),
                                   (f"{i:09d}.txt", f"a photo of object number {i} on a table".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                    sizes += [len(data)] if name.endswith(".jpg") else []
    return float(np.mean(sizes)) / 1024


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (Beam's worker processes)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def time_convert(tars: str, out: str, max_side: int | None, runner: str | None, beam_args: list[str]) -> dict:
    from clipjax.data.convert import ConvertOptions, convert_wds

    shutil.rmtree(out, ignore_errors=True)
    t, c = time.perf_counter(), _cpu_seconds()
    s = convert_wds([tars], ConvertOptions(out_dir=out, max_side=max_side), runner=runner, beam_args=beam_args)
    return {"seconds": time.perf_counter() - t, "cpu_seconds": _cpu_seconds() - c, "written": s["written"]}


def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="clipjax-bench convert", doc=__doc__)
    add_source_flags(p, num_images=4000)
    p.add_argument("--num_tars", type=int, default=16)
    p.add_argument("--max_side", type=int, default=None, help="re-encode larger images (default: decode-check only)")
    p.add_argument("--workers", type=int, default=2, help="DirectRunner worker processes")
    p.add_argument("--rounds", type=int, default=2, help="interleaved repeats; each row reports its best")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    from clipjax.bench.table import emit

    cases = [("single process", None, []),
             (f"Beam DirectRunner, {a.workers} workers", "DirectRunner", [f"--direct_num_workers={a.workers}"])]
    with tempfile.TemporaryDirectory() as tmp:
        tars = os.path.join(tmp, "tars")
        os.makedirs(tars)
        kb = write_tars(tars, a.num_images, a.num_tars, a.width, a.height, a.quality)
        best, cpu = [float("inf")] * len(cases), [float("inf")] * len(cases)
        for _ in range(a.rounds):  # interleaved, so drifting machine load hits every row alike
            for i, (_, runner, args) in enumerate(cases):
                r = time_convert(tars, os.path.join(tmp, f"out{i}"), a.max_side, runner, args)
                assert r["written"] == a.num_images, r
                best[i], cpu[i] = min(best[i], r["seconds"]), min(cpu[i], r["cpu_seconds"])
        from clipjax.data import records

        same = all(open(os.path.join(tmp, "out0", n), "rb").read() == open(os.path.join(tmp, "out1", n), "rb").read()
                   for n in (os.path.basename(q) for q in records.shard_paths(os.path.join(tmp, "out0"), "train")))
    rows = [{"case": name, "images": a.num_images, "tars": a.num_tars, "seconds": s, "images_per_s": a.num_images / s,
             "vs_single": best[0] / s, "cpu_ms_per_image": 1e3 * c / a.num_images, "jpeg_kb": round(kb, 1),
             "size": f"{a.width}x{a.height}", "max_side": a.max_side or 0, "identical_shards": same}
            for (name, _, _), s, c in zip(cases, best, cpu)]
    emit(rows, a.json)
    return 0
