"""Compile-ahead plans with the TPU compiler (libtpu) on this CPU-only machine: nothing executes.

The TPU targets are described v5p topologies (``jax.experimental.topologies``), so
these tests need libtpu (the ``test`` extra installs ``jax[tpu]``), not a TPU.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clipjax import compile_ahead, hlo_flops, mfu
from clipjax.config import load_config, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# model FLOPs / compiler FLOPs for the tiny towers (known tolerance of the analytic count,
# as in test_metrics.test_analytic_flops_match_cost_analysis)
FLOPS_TOLERANCE = (0.85, 1.2)


@pytest.fixture(scope="module")
def v5p_8():
    return compile_ahead.target_devices(compile_ahead.parse_target("tpu:v5p:2x2x2"))


def test_parse_target():
    assert compile_ahead.parse_target("tpu:v5p:8x8x8") == compile_ahead.Target("tpu", topology="v5p:8x8x8")
    assert compile_ahead.parse_target("cpu:64") == compile_ahead.Target("cpu", num_devices=64)
    assert str(compile_ahead.parse_target("tpu:v5e:16x16")) == "tpu:v5e:16x16"
    for bad in ("gpu:8", "cpu:0", "cpu:x", "tpu:", "v5p:4x4x4"):
        with pytest.raises(compile_ahead.TargetError, match="expected tpu:<topology>"):
            compile_ahead.parse_target(bad)


def test_topology_devices_and_bad_name(v5p_8):
    assert len(v5p_8) == 8 and v5p_8[0].platform == "tpu" and v5p_8[0].device_kind == "TPU v5"
    assert jax.default_backend() == "cpu"  # JAX_PLATFORMS=cpu still allows describing a TPU topology
    with pytest.raises(compile_ahead.TargetError, match="tpu:v5p:3x3x3x3"):
        compile_ahead.target_devices(compile_ahead.parse_target("tpu:v5p:3x3x3x3"))


def test_out_of_memory_message_golden():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
           "(2.00T) exceeds available HBM (95.74G).")
    assert compile_ahead.parse_out_of_memory(msg) == (2 * 1024**4, 95.74 * 1024**3)
    assert compile_ahead.parse_out_of_memory("INTERNAL: something else") is None


def test_compiler_hbm_matches_spec_sheet(v5p_8):
    """The TPU compiler's own HBM limit for v5p is the spec sheet's 95 GiB less a small reserve."""
    found = compile_ahead.compiler_hbm_bytes(v5p_8[0])
    spec = compile_ahead.spec_hbm_bytes(v5p_8[0].device_kind)
    assert spec == 95 * 1024**3
    assert found == pytest.approx(95.74 * 1024**3, rel=1e-3)  # libtpu 0.0.42.1


def test_loop_factor_counts_scanned_iterations(v5p_8):
    """TPU cost analysis counts a scan body once; the loop factor and compiled FLOPs count every iteration."""
    mesh = Mesh(np.array(v5p_8[:4]), ("x",))

    def scan_compile(n):
        w = jax.ShapeDtypeStruct((n, 512, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
        x = jax.ShapeDtypeStruct((4096, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P("x")))
        f = lambda w, x: jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0].sum()
        return jax.jit(f).lower(w, x).compile()

    one, sixteen = scan_compile(1), scan_compile(16)
    assert one.cost_analysis()["flops"] == sixteen.cost_analysis()["flops"]  # the undercount being fixed
    assert hlo_flops.loop_factor(one.as_text()) == pytest.approx(1.0)
    assert 6.0 < hlo_flops.loop_factor(sixteen.as_text()) <= 16.0  # work outside the loop does not repeat
    # The TPU backend writes the dot as a convolution; compiled_flops counts it every iteration.
    assert hlo_flops.compiled_flops(sixteen) == pytest.approx(16 * 2 * 1024 * 512 * 512, rel=0.01)


def _sane(row, devices, config):
    assert row["fits"] is True
    assert 0 < row["args_GiB"] < row["peak_GiB"] < row["hbm_GiB"]
    assert row["temp_GiB"] > 0
    assert row["hbm_GiB"] == pytest.approx(95.74, rel=1e-3)
    assert row["model_TFLOP"] == pytest.approx(mfu.clip_train_flops(config.model, config.train.batch_size)
                                               / devices / 1e12)
    lo, hi = FLOPS_TOLERANCE
    assert lo < row["model_TFLOP"] / row["compiler_TFLOP"] < hi, (row["model_TFLOP"], row["compiler_TFLOP"])
    assert row["step_s"] > 0 and 0 < row["mfu"] <= 1.0


@pytest.mark.slow
def test_demo_plan_on_v5p(v5p_8):
    """The demo compiles for 8 v5p chips with its own mesh; the report's fields are consistent."""
    config = load_config(os.path.join(REPO, "configs/demo.py"))
    row = compile_ahead.plan(config, v5p_8)
    assert row["mesh"] == "data 4 x fsdp 2" and row["device"] == "TPU v5p"
    _sane(row, 8, config)


def _run(module, *args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True, text=True,
                          timeout=900, cwd=REPO)


@pytest.mark.slow
def test_train_compile_only_fits_and_reports():
    """`clipjax-train --compile_only --target=tpu:...` prints the plan of the smallest demo and exits 0."""
    proc = _run("clipjax.main", "--config=configs/demo.py:smoke", "--compile_only", "--target=tpu:v5p:2x2x1",
                "--config.mesh.data=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    header, rule, row = proc.stdout.strip().splitlines()[-3:]
    cells, start = {}, 0
    for name, dashes in zip(header.split(), rule.split()):  # columns are aligned to the dashes
        cells[name] = row[start:start + len(dashes)].strip()
        start += len(dashes) + 2
    assert cells["target"] == "tpu:v5p:2x2x1" and cells["mesh"] == "data 2 x fsdp 2"
    assert cells["fits"] == "True" and 0 < float(cells["peak_GiB"]) < float(cells["hbm_GiB"])
    config = validate(load_config(os.path.join(REPO, "configs/demo.py:smoke"), ["--config.mesh.data=2"]), 4)
    assert float(cells["model_TFLOP"]) == pytest.approx(
        mfu.clip_train_flops(config.model, config.train.batch_size) / 4 / 1e12, rel=1e-3)


@pytest.mark.slow
def test_bench_compile_reports_a_config_that_cannot_fit():
    """g/14 without FSDP, 1024 examples a chip: the TPU compiler's verdict, one line, exit 1."""
    proc = _run("clipjax.bench.cli", "compile", "--target=tpu:v5p:2x2x1",
                "--config=configs/clip.py:model=g/14,batch=4096", "--mesh=data=4", "--json")
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("does not fit: data 4 needs") and "TPU v5p has 95.7 GiB" in last, last
