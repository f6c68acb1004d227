"""The step breakdown and the planner on the TPU compiler (libtpu, no TPU): the smallest demo on 4 v5p chips."""

import os

import pytest

from clipjax import compile_ahead, planner, step_breakdown
from clipjax.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def v5p_4():
    return compile_ahead.target_devices(compile_ahead.parse_target("tpu:v5p:2x2x1"))


def _smoke():
    return load_config(os.path.join(REPO, "configs/demo.py:smoke"))


@pytest.fixture(scope="module")
def hand_grid(v5p_4):
    """Three candidates for 4 chips, each compiled by hand: (candidate, row with breakdown).

    FSDP with and without remat (the faster one needs more memory) and data parallelism.
    """
    grid = [c for c in planner.candidates(4, remats=["full", "none"], accums=[1], impls=["chunked"], tensors=[1])
            if (c.data, c.remat) in ((1, "full"), (1, "none"), (4, "full"))]
    assert len(grid) == 3
    return [(c, compile_ahead.plan(planner.apply(_smoke(), c), v5p_4, breakdown=True)) for c in grid]


def test_breakdown_categories_sum_to_the_projected_step(hand_grid):
    for c, row in hand_grid:
        seconds = row["breakdown"]["seconds"]
        assert list(seconds) == list(step_breakdown.CATEGORIES)
        assert sum(seconds.values()) == pytest.approx(row["step_s"], rel=0.01)
        # Both towers' matmuls, the loss and the update all cost time; recomputation only with remat.
        for category in ("matmul: image tower", "matmul: text tower", "loss", "optimizer update",
                         "normalisation, element-wise"):
            assert seconds[category] > 0, (c, category, seconds)
        assert (seconds["remat recomputation"] > 0) == (c.remat == "full"), (c, seconds)
    # FSDP over 4 chips gathers the weights every step: its collectives move bytes; pure data parallelism
    # only reduces gradients.
    by_mesh = {(c.data, c.fsdp): row["breakdown"]["collective_GiB"] for c, row in hand_grid if c.remat == "full"}
    assert sum(by_mesh[(1, 4)].values()) > 0 and sum(by_mesh[(4, 1)].values()) > 0


def test_planner_returns_the_fastest_fitting_candidate_of_the_hand_run_grid(v5p_4, hand_grid):
    smallest = min(row["peak_GiB"] for _, row in hand_grid)
    # The fastest candidate that needs more than the smallest peak, and an HBM that leaves it out.
    fastest = min((row for _, row in hand_grid if row["peak_GiB"] > smallest), key=lambda row: row["step_s"])
    hbm_gib = (smallest + fastest["peak_GiB"]) / 2
    fitting = [(c, row) for c, row in hand_grid if row["peak_GiB"] <= hbm_gib]
    assert 0 < len(fitting) < len(hand_grid)
    expected, expected_row = min(fitting, key=lambda cr: cr[1]["step_s"])
    grid = [c for c, _ in hand_grid]
    rows, best = planner.search(_smoke(), v5p_4, grid, capacity=(hbm_gib * compile_ahead.GIB, "test"))
    assert best["fits"] and best["peak_GiB"] <= hbm_gib  # equal projected times may tie: compare the time
    assert best["candidate"] in [c for c, row in fitting if row["step_s"] == expected_row["step_s"]]
    assert best["step_s"] == pytest.approx(expected_row["step_s"], rel=1e-6)
    for r, (c, row) in zip(rows, hand_grid):
        assert r["status"] == "compiled" and r["fits"] == (row["peak_GiB"] <= hbm_gib)
        assert r["peak_GiB"] == pytest.approx(row["peak_GiB"], rel=1e-6)


def test_memory_estimate_prunes_only_what_cannot_fit(v5p_4):
    """A candidate whose estimate exceeds twice the HBM is not compiled, and never chosen."""
    grid = planner.candidates(4, remats=["none"], accums=[1], impls=["chunked"], tensors=[1])[:1]
    rows, best = planner.search(_smoke(), v5p_4, grid, capacity=(1024.0, "test"))  # 1 KiB of HBM
    assert rows[0]["status"] == "pruned" and best is None


def test_plan_file_overrides_round_trip(tmp_path):
    c = planner.Candidate(2, 2, 1, "full", 2, "ring")
    path = str(tmp_path / "plan.json")
    planner.write_plan(path, {"candidate": c, "step_s": 0.1, "mfu": 0.5, "peak_GiB": 1.0}, target="tpu:v5p:2x2x1",
                       config_spec="configs/demo.py:smoke")
    overrides = planner.read_overrides(path)
    config = load_config(os.path.join(REPO, "configs/demo.py:smoke"), overrides)
    assert (config.mesh.data, config.mesh.fsdp, config.model.remat, config.train.grad_accum,
            config.loss.impl) == (2, 2, "full", 2, "ring")
