"""Console progress: start-up phases, the fixed five-field step line within 120 columns, tables, a tqdm bar."""

import io
import os
import pathlib
import subprocess
import sys
import time

import pytest

from clipjax.progress import MAX_COLUMNS, Progress

ROOT = pathlib.Path(__file__).resolve().parents[1]

ROW = {"train/loss": 3.21014, "train/lr": 1e-4, "train/grad_norm": 2.5, "train/samples_per_sec": 1234.4,
       "train/mfu": 0.1234, "train/eta_sec": 131.0, "data/skipped_examples": 0}


def test_plain_step_line_has_five_fields_in_a_fixed_order():
    out = io.StringIO()
    p = Progress(total_steps=1000, interactive=False, stream=out)
    p.step(120, ROW, now=1.0)
    p.step(121, {"zeroshot/x/top1": 0.5, "zeroshot/x/num_examples": 64}, now=2.0)  # evaluations: tables only
    p.step(130, {"train/loss": 2.0, "train/samples_per_sec": 12.34, "train/mfu": None}, now=3.0)
    assert out.getvalue().splitlines() == [
        "step 120/1000 | loss 3.2101 | 1,234 samples/s | MFU 12.3% | ETA 0:02:11",
        "step 130/1000 | loss 2.0000 | 12.3 samples/s | MFU ? | ETA 0:02:54",  # 870 steps at 10 steps in 2 s
    ]


def test_step_line_fits_in_120_columns():
    out = io.StringIO()
    p = Progress(total_steps=10**12, interactive=False, stream=out)
    p.step(10**12 - 1, {"train/loss": -1e30, "train/samples_per_sec": 1e15, "train/mfu": 12.0,
                        "train/eta_sec": 1e13}, now=0.0)
    p.total_steps = 10**80  # a step count no run has: the line is cut, not wrapped
    p.step(10**80 - 1, ROW, now=1.0)
    first, second = out.getvalue().splitlines()
    assert first == ("step 999999999999/1000000000000 | loss -1.0e+30 | 1.00e+15 samples/s | MFU 1200.0% "
                     "| ETA 2777777777:46:40")
    assert len(second) == MAX_COLUMNS and second.startswith("step 9999")


def test_phases_say_what_start_up_does_and_how_long_it_took():
    out = io.StringIO()
    p = Progress(total_steps=10, interactive=False, stream=out)
    with p.phase("compiling the train step"):
        out.write("(compiling)\n")
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["compiling the train step...", "(compiling)"]
    assert lines[2].startswith("compiling the train step: done in ") and lines[2].endswith("s")


def test_table_and_disabled_progress():
    out = io.StringIO()
    Progress(interactive=False, stream=out).table("evaluation", {"zeroshot/x/top1": 0.5, "n": 3}, step=8)
    assert out.getvalue() == "== evaluation (step 8) ==\n  zeroshot/x/top1  0.5000\n  n                3\n"
    quiet = io.StringIO()
    p = Progress(total_steps=10, interactive=False, stream=quiet, enabled=False)
    p.step(1, ROW, now=0.0)
    p.note("x")
    p.table("evaluation", {"a": 1.0})
    assert quiet.getvalue() == ""


def test_terminal_bar_is_redrawn_in_place_within_120_columns():
    out = io.StringIO()
    p = Progress(total_steps=1000, interactive=True, stream=out)
    p.step(120, ROW, now=1.0)
    p.note("eval took 2.0s")  # printed above the bar, which is then redrawn
    p.step(240, dict(ROW, **{"train/loss": 1.5}), now=2.0)
    p.end_bar()
    frames = [f for f in out.getvalue().replace("\n", "\r").split("\r") if f.strip()]
    assert "eval took 2.0s" in frames
    assert frames[-1].startswith("step 240/1000 |") and frames[-1].rstrip().endswith(
        "| loss 1.5000 | 1,234 samples/s | MFU 12.3% | ETA 0:02:11")
    assert all(len(f) <= MAX_COLUMNS for f in frames)
    assert out.getvalue().endswith("\n")  # later output starts on a fresh line


# ---------------------------------------------------------------- a real run with stdout in a file


@pytest.mark.slow
def test_progress_reaches_a_redirected_stdout_while_the_run_is_going(tmp_path):
    """Issue 12: lines written to a file arrive as they are printed, not a buffer (8 KiB) later."""
    log_path = tmp_path / "stdout.txt"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env.pop("PYTHONUNBUFFERED", None)
    cmd = [sys.executable, "-c", "from clipjax.main import train_main; train_main()",
           f"--config={ROOT / 'configs' / 'demo.py'}:smoke,data={tmp_path / 'synthetic'}",
           f"--workdir={tmp_path / 'run'}", "--config.train.steps=1000000"]
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.PIPE)
        try:
            deadline = time.time() + 300
            # The start-up lines are there while the train step is still compiling (the run has a million steps).
            while time.time() < deadline and proc.poll() is None:
                if "compiling the train step..." in log_path.read_text().splitlines():
                    break
                time.sleep(0.1)
            running = proc.poll() is None
        finally:
            proc.kill()
            _, err = proc.communicate()
    assert running, err.decode()[-3000:]
    lines = log_path.read_text().splitlines()
    assert lines[:2] == ["opening the training data...", lines[1]] and lines[1].startswith(
        "opening the training data: done in ")
    assert "compiling the train step..." in lines
    assert log_path.stat().st_size < 8192  # far below a block buffer: only line flushing explains it
