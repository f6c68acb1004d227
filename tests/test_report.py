"""report.png: which curves land in which panel, on which axis, over which range."""

import os
import struct

import numpy as np

from matplotlib import pyplot as plt

from clipjax import report as report_lib


def _rows(with_evals=True):
    rows = []
    for s in range(1, 51):
        rows.append({"step": s, "train/loss": 5.0 / s, "train/scale": 14.0 + s / 10, "train/bias": -10.0 + s / 100,
                     "train/i2t_acc": s / 50, "train/t2i_acc": s / 60, "train/lr": 1e-3 * min(1, s / 10),
                     "train/samples_per_sec": 1000.0 + s, "train/mfu": 0.4 if s > 1 else None})
        if with_evals and s % 10 == 0:
            rows.append({"step": s, "zeroshot/imagenet/top1": s / 100, "zeroshot/imagenet/num_examples": 64,
                         "retrieval/coco/i2t_r1": s / 120, "retrieval/coco/i2t_mean_rank": 30.0})
    return rows


def _panels(fig):
    """{title: axes} of the titled (left) axes; twin axes are found through their shared x."""
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def _labels(ax):
    return sorted(line.get_label() for line in ax.get_lines())


def _twin(fig, ax):
    return [other for other in fig.axes if other is not ax and other.bbox.bounds == ax.bbox.bounds]


def test_panels_separate_throughput_mfu_train_accuracy_and_evals():
    fig = report_lib.make_figure(_rows())
    try:
        panels = _panels(fig)
        assert list(panels) == ["training loss", "logit scale", "in-batch accuracy (train)", "evaluation",
                                "throughput", "MFU", "learning rate"]
        assert _labels(panels["throughput"]) == ["train/samples_per_sec"]
        assert panels["throughput"].get_ylabel() == "samples/s"
        assert _labels(panels["MFU"]) == ["train/mfu"]
        assert "%" in panels["MFU"].get_ylabel()
        assert np.nanmax(panels["MFU"].get_lines()[0].get_ydata()) == 40.0  # percent
        assert _labels(panels["in-batch accuracy (train)"]) == ["train/i2t_acc", "train/t2i_acc"]
        # Recalls and accuracies only: ranks and counts live on other scales.
        assert _labels(panels["evaluation"]) == ["retrieval/coco/i2t_r1", "zeroshot/imagenet/top1"]
        for title in ("in-batch accuracy (train)", "evaluation"):
            assert panels[title].get_ylim() == (0, 1.02)
        # The scale axis starts at 0, so a drift from 14.1 to 19 is not drawn as a cliff.
        scale = panels["logit scale"]
        assert _labels(scale) == ["train/scale"] and scale.get_ylim()[0] == 0
        (bias_axis,) = _twin(fig, scale)
        assert _labels(bias_axis) == ["train/bias"] and bias_axis.get_ylabel() == "bias"
        for title in ("throughput", "MFU"):
            assert panels[title].get_ylim()[0] == 0 and not _twin(fig, panels[title])
    finally:
        plt.close(fig)


def test_panels_without_data_are_left_out():
    fig = report_lib.make_figure([{k: v for k, v in r.items() if k != "train/bias"} for r in _rows(False)])
    try:
        panels = _panels(fig)
        assert "evaluation" not in panels and "in-batch accuracy (train)" in panels
        assert not _twin(fig, panels["logit scale"])
    finally:
        plt.close(fig)


def test_write_report_png(tmp_path):
    path = report_lib.write_report(str(tmp_path), rows=_rows())
    assert path == str(tmp_path / "report.png")
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert width >= 1000 and height >= 1000
    assert os.path.getsize(report_lib.write_report(str(tmp_path / "empty"))) > 1000


def test_a_single_final_eval_is_drawn_as_bars_with_chance_ticks(tmp_path):
    """Only the final eval ran: one bar per metric at its value, the chance level a tick on its bar."""
    rows = [r for r in _rows(with_evals=False)]
    rows.append({"step": 50, "zeroshot/imagenet/top1": 0.42, "retrieval/coco/i2t_r1": 0.17})
    fig = report_lib.make_figure(rows, chance={"zeroshot/imagenet/top1": 0.001, "retrieval/coco/i2t_r1": 0.0002})
    try:
        ax = _panels(fig)["evaluation (step 50)"]
        bars = {t.get_text(): p.get_width() for t, p in zip(ax.get_yticklabels(), ax.patches)}
        assert bars == {"retrieval/coco/i2t_r1": 0.17, "zeroshot/imagenet/top1": 0.42}
        ticks = sorted(line.get_xdata()[0] for line in ax.get_lines())
        assert ticks == [0.0002, 0.001]
    finally:
        plt.close(fig)
