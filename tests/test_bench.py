"""clipjax-bench suites end to end at toy sizes: each row comes out with its numbers."""

import json
import pathlib

from clipjax.bench import cli

DEMO = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py")


def _rows(capsys, argv, err_lines=None):
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    if err_lines is not None:
        err_lines.extend(captured.err.splitlines())
    out = json.loads(captured.out)
    assert out["environment"]["devices"] == 8
    return out["rows"]


def test_loss_suite_measures_each_impl(capsys):
    rows = _rows(capsys, ["loss", "--batch=64", "--dim=16", "--impls=allgather,chunked,ring", "--time_max_batch=64",
                          "--repeats=1", "--json"])
    assert [(r["impl"], r["batch"], r["devices"]) for r in rows] == [("allgather", 64, 8), ("chunked", 64, 8),
                                                                     ("ring", 64, 8)]
    assert all(r["temp_MiB"] > 0 and r["step_s"] > 0 for r in rows)
    assert rows[0]["mem_vs_allgather"] == rows[0]["time_vs_allgather"] == 1.0


def test_data_suite_times_each_case(capsys):
    rows = _rows(capsys, ["data", "--num_images=8", "--image_size=32", "--width=64", "--height=48", "--batch=4",
                          "--workers=1", "--passes=1", "--rounds=1", "--naflex_len=16", "--patch_size=8", "--json"])
    assert [(r["case"], r["workers"]) for r in rows] == [
        ("pillow full decode (convert RGB)", 0), ("pipeline, draft decode", 0), ("pipeline, full decode", 0),
        ("pipeline, draft decode", 1), ("NaFlex pipeline (16 patches of 8), draft decode", 0)]
    assert all(r["images_per_s"] > 0 for r in rows) and rows[0]["vs_raw"] == 1.0
    assert rows[4]["per_core_vs_fixed"] > 0


def test_compile_suite_plans_each_mesh(capsys, tmp_path):
    err = []
    rows = _rows(capsys, ["compile", f"--config={DEMO}:smoke,data={tmp_path}", "--mesh=data=8",
                          "--mesh=data=2,fsdp=4", "--peak=1e12", "--json"], err)
    assert [r["mesh"] for r in rows] == ["data 8", "data 2 x fsdp 4"]
    # A stage line per mesh on stderr, so minutes of compiling are not silent.
    assert [line for line in err if line.startswith("compiling the train step")] == [
        f"compiling the train step for cpu:8, mesh {m} ..." for m in ("data=8", "data=2,fsdp=4")]
    for r in rows:
        assert r["batch"] == 32 and 0 < r["args_GiB"] <= r["peak_GiB"] and r["model_TFLOP"] > 0 and r["fits"]
    # fsdp shards the parameters and their Adam moments: fewer argument bytes per device.
    assert rows[1]["args_GiB"] < rows[0]["args_GiB"]


def test_train_suite_times_the_real_step_on_the_configs_devices(capsys, tmp_path):
    rows = _rows(capsys, ["train", f"--config={DEMO}:smoke,data={tmp_path / 'data'}", "--batch=16",
                          "--data=excluded,included", "--steps=1", "--rounds=1", "--warmup=0", "--json"])
    assert [r["data"] for r in rows] == ["excluded", "included"]
    for r in rows:
        # The demo's mesh names 8 devices; the benchmark runs the step there, data parallel.
        assert r["devices"] == 8 and r["batch"] == 16
        assert r["step_s"] > 0 and r["samples_per_s"] == 16 / r["step_s"]
        assert 0 < r["mfu"] <= r["hfu"] and r["GFLOP_model/dev"] > 0 and r["peak_GiB"] > 0
        assert r["faults/step"] >= 0 and r["kernel_s/step"] >= 0


def test_data_suite_webdataset_rows(capsys):
    rows = _rows(capsys, ["data", "--source=webdataset", "--num_images=8", "--image_size=32", "--width=64",
                          "--height=48", "--batch=4", "--workers=0", "--passes=1", "--rounds=1", "--latency_ms=1",
                          "--json"])
    assert [r["case"] for r in rows[4:7]] == ["webdataset random access, draft decode"] * 2 + [
        "webdataset stream, bucket +1 ms a request"]
    assert rows[4]["per_core_vs_arrayrecord"] > 0 and all(r["images_per_s"] > 0 for r in rows)


def test_openclip_worker_starts_pinned_without_forking_jax(devices):
    """The worker is pinned to the given cores, and starting it triggers no fork hook (JAX's deadlock warning)."""
    import os
    import warnings

    from clipjax.bench import openclip_step, train

    tower = {"width": 16, "depth": 1, "heads": 2, "mlp_dim": 32}
    spec = {"embed_dim": 8, "act": "gelu", "batch": 2, "threads": 1, "warmup": 0, "max_logit_scale": 100.0,
            "image": {**tower, "patch_size": 8, "image_size": 16, "pool": "tok", "ln_pre": True},
            "text": {**tower, "context_length": 8, "vocab_size": 64, "causal": True,
                     "pool": next(iter(openclip_step._TEXT_POOLS))},
            "optim": {"lr": 1e-3, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "clip_norm": 1.0}}
    core = min(os.sched_getaffinity(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        worker = train.OpenClipWorker(spec, {core})
    try:
        assert os.sched_getaffinity(worker.proc.pid) == {core}
        assert worker.run(1) > 0
    finally:
        worker.close()
    assert not [w for w in caught if "fork" in str(w.message)]
