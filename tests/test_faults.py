"""Faults injected for real: damaged checkpoints, divergence, a full disk, Ctrl-C, planted symlinks.

Each test breaks something the way it breaks in the field (truncated and deleted
files, a learning rate that blows the weights up, a filesystem that runs out of
space, real signals to real processes, a symlink at a predictable path) and
checks what survives.
"""

import contextlib
import errno
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import jax
import numpy as np
import pytest

from clipjax import checkpoint as ckpt_lib
from clipjax import config_diff
from clipjax.config import load_config
from clipjax.report import read_metrics
from clipjax.train import LossSpikeError, NonFiniteError, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.py")
QUIET = ("--config.evals.synthetic_zeroshot.every=0", "--config.evals.synthetic_retrieval.every=0",
         "--config.train.report=false")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def smoke(data_dir, *overrides):
    return load_config(f"{DEMO}:smoke,data={data_dir}", [*QUIET, *overrides])


def losses_of(workdir):
    return {r["step"]: r["train/loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if "train/loss" in r}


def saved_params(workdir, step):
    """The params saved at ``step`` as host numpy arrays."""
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))["params"]


def steps_on_disk(workdir):
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


# ---------------------------------------------------------------- 1. damaged checkpoints


@pytest.mark.slow
def test_damaged_newest_checkpoints_fall_back_to_the_newest_intact_one(data_dir, tmp_path, caplog):
    run = str(tmp_path / "run")
    sync = ("--config.checkpoint.every=2", "--config.checkpoint.keep=3", "--config.checkpoint.async_save=false")
    train(smoke(data_dir, "--config.train.steps=6", *sync), run)
    want = losses_of(run)
    ck = os.path.join(run, "checkpoints")
    # Step 6: every array file cut in half. Step 4: its state/ folder gone.
    for folder, _, files in os.walk(os.path.join(ck, "6", "state")):
        for name in files:
            path = os.path.join(folder, name)
            if os.sep + "d" + os.sep in path + os.sep and os.path.basename(folder) == "d":
                os.truncate(path, os.path.getsize(path) // 2)
    shutil.rmtree(os.path.join(ck, "4", "state"))

    with caplog.at_level(logging.WARNING, logger="clipjax"):
        train(smoke(data_dir, "--config.train.steps=6", *sync), run)
    damaged = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(damaged) == 2 and "step 6" in damaged[0] and "step 4" in damaged[1], damaged
    assert "OUT_OF_RANGE" in damaged[0] or "not valid" in damaged[0], damaged[0]
    assert "state/ folder is missing" in damaged[1], damaged[1]
    # Moved aside with their files, never deleted; orbax lists only the intact steps.
    assert {"2", "4", "6", "4.damaged", "6.damaged"} <= set(steps_on_disk(run))
    assert os.listdir(os.path.join(ck, "6.damaged", "state"))
    assert ckpt_lib.Checkpointer(run, every=2, keep=3).all_steps() == [2, 4, 6]
    # Resumed from step 2: steps 3-6 were trained again, exactly as the first time.
    got = losses_of(run)
    for step in (3, 4, 5, 6):
        assert got[step] == want[step], (step, got[step], want[step])


@pytest.mark.slow
def test_a_checkpoint_of_other_shapes_is_incompatible_not_damaged(data_dir, tmp_path):
    import orbax.checkpoint as ocp

    run = str(tmp_path / "run")
    train(smoke(data_dir, "--config.train.steps=2", "--config.checkpoint.every=2",
                "--config.checkpoint.async_save=false"), run)
    saved = ocp.StandardCheckpointer().metadata(os.path.join(run, "checkpoints", "2", "state")).item_metadata.tree
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)
    abstract["params"]["logit_scale"] = jax.ShapeDtypeStruct((2,), np.float32)  # another model's parameter
    ck = ckpt_lib.Checkpointer(run, every=2, keep=3)  # no saved config to compare: the arrays decide
    with pytest.raises(ckpt_lib.IncompatibleCheckpoint, match=r"^cannot restore step 2 .*: "
                                                              r"params.logit_scale: checkpoint \(\) vs config \(2,\)$"):
        ck.restore_newest_intact(lambda step: ck.restore(step, abstract))
    assert steps_on_disk(run) == ["2"]  # left in place


# ---------------------------------------------------------------- 4. divergence


def _diverging(data_dir, *extra):
    """SigLIP at lr 1e6: the loss jumps from ~10 to ~3e7 at step 2 (finite garbage), then goes non-finite."""
    return smoke(data_dir, "--config.train.steps=20", "--config.loss.kind=sigmoid", "--config.optim.lr=1e6",
                 "--config.optim.warmup_steps=0", "--config.optim.schedule=constant", "--config.checkpoint.every=1",
                 "--config.checkpoint.keep=1", "--config.checkpoint.async_save=false", *extra)


@pytest.mark.slow
def test_divergence_saves_nothing_inside_the_non_finite_streak(data_dir, tmp_path):
    run = str(tmp_path / "run")
    with pytest.raises(NonFiniteError, match=r"restart from step \d+ in") as info:
        train(_diverging(data_dir, "--config.train.max_consecutive_skips=3"), run)
    rows = read_metrics(os.path.join(run, "metrics.jsonl"))
    first_bad = min(r["step"] for r in rows if r.get("train/consecutive_skips", 0) >= 1)
    # keep=1: the only checkpoint left is the last one before the streak, not one taken inside it.
    assert ckpt_lib.Checkpointer(run, every=1, keep=1).all_steps() == [first_bad - 1]
    assert f"restart from step {first_bad - 1} in" in str(info.value)


def test_a_loss_spike_stops_the_run_before_saving_and_names_the_step_to_restart_from(data_dir, tmp_path):
    run = str(tmp_path / "run")
    # Two warmup steps: lr 0 then 5e5; the loss of step 3 measures the blown-up weights of step 2.
    with pytest.raises(LossSpikeError, match=r"^step 3: loss .* weights of step 2; .* restart from step 1 in"):
        train(_diverging(data_dir, "--config.optim.warmup_steps=2", "--config.checkpoint.keep=3",
                         "--config.train.loss_spike_factor=10", "--config.train.loss_spike_window=1"), run)
    assert ckpt_lib.Checkpointer(run, every=1, keep=3).all_steps() == [1, 2]  # step 3 was not saved
    params = saved_params(run, 1)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_retention_keeps_a_pinned_step_beyond_keep(tmp_path):
    """The step pinned when a divergence begins outlives checkpoint.keep."""
    ck = ckpt_lib.Checkpointer(str(tmp_path), every=1, keep=1, async_save=False)
    state = {"w": np.arange(4.0)}
    for step in (1, 2):
        ck.save(step, state)
    assert ck.pin_newest() == 2
    for step in (3, 4):
        ck.save(step, state)
    ck.close()
    assert ckpt_lib.Checkpointer(str(tmp_path), every=1, keep=1).all_steps() == [2, 4]


# ---------------------------------------------------------------- 7. disk full


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 MiB tmpfs (needs root: mount)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_the_run_at_the_next_step_naming_the_path(data_dir, tmp_path, tiny_disk, monkeypatch):
    from clipjax.train import _default_data_iterator

    run = tmp_path / "run"
    run.mkdir()
    os.symlink(tiny_disk, run / "checkpoints")  # only the checkpoints live on the small disk

    class FillsTheDisk:
        """The real pipeline; fills the disk when step 4 starts, but for 64 KiB.

        The step-4 save then creates its folders and small metadata files, and only its
        arrays (~430 KB) fail to fit, in orbax's background thread.
        """

        def __init__(self, config, mesh):
            self.inner, self.n = _default_data_iterator(config, mesh), 0

        def __next__(self):
            self.n += 1
            if self.n == 4:
                filler = tiny_disk / "filler"
                with open(filler, "wb", buffering=0) as f:
                    try:
                        while True:
                            f.write(b"\0" * (1 << 16))
                    except OSError as e:
                        assert e.errno == errno.ENOSPC
                os.truncate(filler, os.path.getsize(filler) - (1 << 16))
            return next(self.inner)

        def __getattr__(self, name):  # num_skipped, save_args, restore_args ...
            return getattr(self.inner, name)

    iterators = []

    def make(config, mesh):
        iterators.append(FillsTheDisk(config, mesh))
        return iterators[-1]

    # The background save (and its failure) ends before the next step, however loaded the
    # machine: the test is then about where the run notices, not about the thread's speed.
    original_save = ckpt_lib.Checkpointer.save

    def save_and_let_it_finish(self, step, *args, **kwargs):
        started = original_save(self, step, *args, **kwargs)
        deadline = time.time() + 120
        while self.manager.is_saving_in_progress() and time.time() < deadline:
            time.sleep(0.05)
        return started

    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save_and_let_it_finish)

    with pytest.raises(ckpt_lib.CheckpointSaveError, match=r"checkpoint step 4 to .*checkpoints/4 failed: .*"
                                                           r"No space left on device"):
        train(smoke(data_dir, "--config.train.steps=12", "--config.checkpoint.every=4"), str(run),
              data_iterator_fn=make)
    assert iterators[0].n < 8  # surfaced in the steps after the failed save, before the next save (8)
    assert ckpt_lib.Checkpointer(str(run), every=4, keep=3).all_steps() == []


# ---------------------------------------------------------------- 2. Ctrl-C


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    """After the first SIGINT the stop is requested and the default action is back."""
    script = textwrap.dedent("""
        import os, signal, sys, time
        from clipjax.preemption import StopRequest
        stop = StopRequest(0)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert stop.at(1) and stop.signal_name == "SIGINT"
        print("first Ctrl-C handled", flush=True)
        time.sleep(120)
        print("still alive", flush=True)
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"first Ctrl-C handled\n", proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # only if the second Ctrl-C did not end it
    assert proc.returncode == -signal.SIGINT, err.decode()[-2000:]
    assert b"still alive" not in out


# ---------------------------------------------------------------- 8. launcher temp files


def test_local_launcher_does_not_follow_a_symlink_planted_at_a_predictable_log_path(tmp_path):
    port = 40000 + os.getpid() % 20000
    victim = tmp_path / "victim"
    victim.mkdir()
    planted = pathlib.Path(f"/tmp/clipjax-local-{port}")
    if planted.is_symlink() or planted.exists():
        pytest.skip(f"{planted} exists already")
    planted.symlink_to(victim)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "clipjax-train").write_text("#!/bin/sh\necho fake process \"$@\"\n")
    (fake_bin / "clipjax-train").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TMPDIR"}
    env["CLIPJAX_BIN"] = str(fake_bin)
    try:
        proc = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "2", f"--port={port}", "--", "--x=1"],
                              env=env, capture_output=True, timeout=120)
    finally:
        planted.unlink()
    assert proc.returncode == 0, proc.stderr.decode()
    assert list(victim.iterdir()) == []
    logdir = proc.stderr.decode().split("logs in ")[1].split()[0]
    assert not os.path.islink(logdir) and oct(os.stat(logdir).st_mode & 0o777) == "0o700"
    assert "fake process --coordinator=127.0.0.1" in (pathlib.Path(logdir) / "process_1.log").read_text()
    shutil.rmtree(logdir)


def test_tpu_pod_launcher_ships_the_archive_to_a_private_path(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "calls"
    (fake_bin / "gcloud").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {calls}\n")
    (fake_bin / "gcloud").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}", TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh"), "--name=n", "--zone=z", "--",
                           "--config=c"], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = calls.read_text().splitlines()
    scp = [line for line in lines if " scp " in f" {line} "]
    assert len(scp) == 1 and "n:.clipjax-upload/clipjax.tar.gz" in scp[0], lines
    assert not any("/tmp/clipjax.tar.gz" in line for line in lines), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "calls"]  # the local archive is cleaned up


# ---------------------------------------------------------------- round two (issue 24)


def no_evals(config):
    with config.unlocked():
        for name in list(config.evals.keys()):
            del config.evals[name]
    return config


def test_a_failing_final_evaluation_keeps_the_trained_steps(data_dir, tmp_path):
    """Synthetic labels reach 23 but the class list has two names: only the evaluation itself can tell."""
    from clipjax.errors import UserError

    names = tmp_path / "two.txt"
    names.write_text("cat\ndog\n")
    config = smoke(data_dir, "--config.train.steps=2", "--config.checkpoint.every=100",
                   f"--config.evals.synthetic_zeroshot.classnames={names}",
                   "--config.evals.synthetic_zeroshot.templates=single",
                   "--config.evals.synthetic_zeroshot.max_examples=8", "--config.evals.synthetic_zeroshot.batch_size=8")
    with config.unlocked():
        del config.evals["synthetic_retrieval"]
    run = str(tmp_path / "run")
    with pytest.raises(UserError, match=r"has labels up to \d+ but classnames lists 2 names.*evaluating step 2; "
                                        r"newest checkpoint: step 2 in"):
        train(config, run)
    assert ckpt_lib.Checkpointer(run, every=100, keep=3).all_steps() == [2]  # saved before the evaluation


@pytest.fixture(scope="module")
def labelled_data(tmp_path_factory):
    """A converted folder of three classes, train and test splits (classes.txt, summaries)."""
    from PIL import Image

    from clipjax.data.convert import ConvertOptions, convert_folder

    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("cat", "dog", "bird"):
            (root / "photos" / split / c).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                root / "photos" / split / c / "0.png")
        convert_folder(str(root / "photos" / split), ConvertOptions(out_dir=str(root / "data"), split=split))
    return root / "data"


@pytest.mark.parametrize("names, split, message", [
    ("cat\ndog\n", "test", r"split 'test' of .* has labels up to 2 but classnames lists 2 names"),
    ("\n\n", "test", r"classnames=.* lists no class names"),
    ("cat\ndog\nbird\n", "val", r"no shards of split 'val' in"),
])
def test_evaluations_are_checked_before_training(labelled_data, tmp_path, names, split, message):
    from clipjax.errors import UserError
    from clipjax.evals import preflight

    (tmp_path / "names.txt").write_text(names)
    config = load_config(f"{ROOT}/configs/custom.py:data={labelled_data},eval_split={split}",
                         [f"--config.evals.zeroshot.classnames={tmp_path / 'names.txt'}"])
    with pytest.raises(UserError, match=r"^config\.evals\.\w+.*" + message):
        preflight.check_entries(config)


@contextlib.contextmanager
def unprivileged():
    """File permissions apply: root drops to nobody's effective uid (every thread: glibc's setxid)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_an_unreadable_checkpoint_stops_the_run_and_moves_nothing():
    import jax.numpy as jnp

    base = tempfile.mkdtemp(prefix="clipjax-unreadable-")  # nobody must reach it: not under pytest's 0700 folder
    os.chmod(base, 0o755)
    try:
        ck = ckpt_lib.Checkpointer(base, every=1, keep=3, async_save=False)
        state = {"w": jnp.arange(4.0)}
        ck.save(1, state)
        ck.close()
        for folder, dirs, files in os.walk(base):
            for d in dirs:
                os.chmod(os.path.join(folder, d), 0o755)
        for folder, _, files in os.walk(os.path.join(base, "checkpoints", "1", "state")):
            for name in files:
                os.chmod(os.path.join(folder, name), 0o000)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
        ck = ckpt_lib.Checkpointer(base, every=1, keep=3, async_save=False)
        with unprivileged(), pytest.raises(ckpt_lib.CheckpointUnreadable,
                                           match=r"cannot read checkpoint step 1 in .*: .*Permission denied.*"
                                                 r"it is not damaged and nothing was moved"):
            ck.restore_newest_intact(lambda step: ck.restore(step, abstract))
        assert sorted(os.listdir(os.path.join(base, "checkpoints"))) == ["1"]
    finally:
        shutil.rmtree(base)


def test_when_every_checkpoint_is_damaged_the_run_stops_and_starting_over_is_explicit(data_dir, tmp_path):
    run = str(tmp_path / "run")
    config = lambda *extra: no_evals(smoke(data_dir, "--config.train.steps=2", "--config.checkpoint.every=2",  # noqa
                                           "--config.checkpoint.async_save=false", *extra))
    train(config(), run)
    first = (pathlib.Path(run) / "metrics.jsonl").read_text()
    shutil.rmtree(os.path.join(run, "checkpoints", "2", "state"))
    with pytest.raises(ckpt_lib.AllCheckpointsDamaged, match=r"every checkpoint in .* is damaged .*: 2\); .*"
                                                            r"--config.checkpoint.start_over_if_damaged=true"):
        train(config(), run)
    assert steps_on_disk(run) == ["2.damaged"]
    assert (pathlib.Path(run) / "metrics.jsonl").read_text() == first  # nothing dropped
    train(config("--config.checkpoint.start_over_if_damaged=true"), run)
    assert steps_on_disk(run) == ["2", "2.damaged"]
    # The first run's lines after step 0 are kept beside the new ones, not dropped.
    assert (pathlib.Path(run) / "metrics.dropped.jsonl").read_text() == first
    assert losses_of(run) == {r["step"]: r["train/loss"] for r in read_metrics_text(first)}  # same run again


def read_metrics_text(text):
    import json

    return [r for r in map(json.loads, text.splitlines()) if "train/loss" in r]


def test_a_second_run_on_a_live_workdir_stops_with_one_line_and_a_crashed_one_leaves_no_stale_lock(
        data_dir, tmp_path):
    from clipjax.lock import FolderBusy
    from clipjax.train import workdir_lock

    run = str(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from clipjax.train import workdir_lock\n"
                               f"with workdir_lock({run!r}):\n print('holding', flush=True); time.sleep(600)"],
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"holding\n"
        with pytest.raises(FolderBusy, match=rf"^workdir {run} is in use by \S+ pid {holder.pid} "
                                             r"\(lock .*\.lock\); wait for that run"):
            train(no_evals(smoke(data_dir, "--config.train.steps=1")), run)
        assert not os.path.exists(os.path.join(run, "metrics.jsonl"))
    finally:
        holder.kill()  # SIGKILL: no clean-up runs in the holder
        holder.wait()
    with workdir_lock(run):  # the kernel dropped the dead holder's lock
        pass


def test_config_changes_on_resume_are_listed_and_exactness_breaking_ones_need_a_flag(data_dir, tmp_path, caplog):
    run = str(tmp_path / "run")
    base = ("--config.checkpoint.every=2", "--config.checkpoint.async_save=false")
    train(no_evals(smoke(data_dir, "--config.train.steps=2", *base)), run)
    with pytest.raises(config_diff.ResumeChanged, match=r"resuming step 2 .*: seed: checkpoint 0 vs config 1; "
                                                        r"train.batch_size: checkpoint 32 vs config 16; .*"
                                                        r"--config.checkpoint.accept_changes=true"):
        train(no_evals(smoke(data_dir, "--config.train.steps=3", "--config.train.batch_size=16", "--config.seed=1",
                             *base)), run)
    with caplog.at_level(logging.WARNING, logger="clipjax"):
        train(no_evals(smoke(data_dir, "--config.train.steps=3", "--config.optim.lr=0.00123", *base)), run)
    said = [r.getMessage() for r in caplog.records if "changed config field" in r.getMessage()]
    assert len(said) == 1 and "optim.lr" in said[0] and "train.steps 2 -> 3" in said[0], said
    assert max(losses_of(run)) == 3


def test_rewriting_metrics_on_a_full_disk_is_one_clear_error(tiny_disk):
    from clipjax.metrics import MetricsWriteError, MetricWriter

    writer = MetricWriter(str(tiny_disk))
    for step in range(1, 11):
        writer.write(step, {"train/loss": 1.0 / step})
    writer.close()
    before = (tiny_disk / "metrics.jsonl").read_text()
    with open(tiny_disk / "filler", "wb", buffering=0) as f:
        with pytest.raises(OSError):
            while True:
                f.write(b"\0" * (1 << 16))
    with pytest.raises(MetricsWriteError, match=r"^cannot rewrite .*metrics.jsonl for the resume from step 5: "
                                                r"No space left on device; free space"):
        MetricWriter(str(tiny_disk)).truncate_after(5)
    assert (tiny_disk / "metrics.jsonl").read_text() == before


def test_two_conversions_into_one_out_the_second_stops_with_one_line(tmp_path):
    from clipjax.data.convert import ConvertOptions, convert_folder
    from clipjax.data.convert.driver import LOCK_FILE
    from clipjax.data.convert.options import ConvertError

    from PIL import Image

    (tmp_path / "photos" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "cat" / "0.png")
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(  # a conversion in progress holds the lock as the driver takes it
        [sys.executable, "-c", "import time\nfrom clipjax.lock import FolderLock\n"
                               f"FolderLock({str(out / LOCK_FILE)!r}, what='x', fix='y').acquire()\n"
                               "print('holding', flush=True); time.sleep(600)"],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"holding\n"
        with pytest.raises(ConvertError, match=rf"^--out={out} is in use by \S+ pid {holder.pid} .*wait for that "
                                               r"conversion to end, or convert into another --out"):
            convert_folder(str(tmp_path / "photos"), ConvertOptions(out_dir=str(out)))
    finally:
        holder.kill()
        holder.wait()
    assert sorted(os.listdir(out)) == [LOCK_FILE]  # nothing of the second conversion was written


def test_ctrl_c_before_the_loop_is_one_line_and_status_130(capsys):
    from clipjax.errors import run_cli

    def compiling(argv):
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered while "compiling"
        time.sleep(5)

    assert run_cli("clipjax-train", compiling, []) == 130
    err = capsys.readouterr().err
    assert err == "clipjax-train: interrupted (Ctrl-C); what was complete is kept, rerun to continue\n"


def test_profile_steps_traces_the_named_steps_only(data_dir, tmp_path):
    import gzip
    import json

    run = tmp_path / "run"
    train(no_evals(smoke(data_dir, "--config.train.steps=4", "--config.train.profile_steps=1:3")), str(run))
    traces = list((run / "profile").rglob("perfetto_trace.json.gz"))
    assert len(traces) == 1 and list((run / "profile").rglob("*.xplane.pb")), list((run / "profile").rglob("*"))
    events = json.loads(gzip.decompress(traces[0].read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    steps = {int(e["args"]["step_num"]) for e in events if e.get("name") == "train" and "step_num" in e.get("args", {})}
    assert steps == {1, 2}


def test_a_host_round_trip_inside_the_loop_fails_under_the_transfer_guard(data_dir, tmp_path):
    """Positive control of the guard: the one explicit fetch per step passes (every other test); a batch
    copied to the host and fed back (an implicit transfer each way) fails at once."""
    from clipjax.train import _default_data_iterator

    class RoundTrips:
        def __init__(self, config, mesh):
            self.inner, self.n = _default_data_iterator(config, mesh), 0

        def __next__(self):
            batch, self.n = next(self.inner), self.n + 1
            # np.asarray is the accidental sync (device to host; on CPU already host memory, so JAX
            # checks only the way back, host to device, when the step reads the numpy array).
            return {k: np.asarray(v) if self.n == 2 else v for k, v in batch.items()}

        def __getattr__(self, name):
            return getattr(self.inner, name)

    with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
        train(no_evals(smoke(data_dir, "--config.train.steps=3")), str(tmp_path / "run"), data_iterator_fn=RoundTrips)


def test_start_up_mistakes_of_round_two_are_one_line(labelled_data, tmp_path, capsys):
    import jax.numpy as jnp
    from helpers import assert_one_line_error, run_in_process

    from clipjax.main import eval_main, train_main

    (tmp_path / "syntax.py").write_text("def get_config(arg=None):\n    return (\n")
    (tmp_path / "imports.py").write_text("import no_such_module_here\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    trained = tmp_path / "trained"
    ck = ckpt_lib.Checkpointer(str(trained), every=1, keep=3, async_save=False)
    ck.save(2, {"w": jnp.arange(4.0)})
    ck.close()
    custom = f"--config={ROOT}/configs/custom.py:data={labelled_data}"
    cases = [
        (train_main, [f"--config={tmp_path / 'syntax.py'}"], [f"--config={tmp_path / 'syntax.py'}: line 2:"]),
        (train_main, [f"--config={tmp_path / 'imports.py'}"], ["No module named 'no_such_module_here'",
                                                               "fix the import or install"]),
        (train_main, [f"--config={ROOT}/configs/custom.py:data={empty}"], [f"data.path={empty}: no shards of split "
                                                                           "'train'"]),
        (eval_main, [custom, f"--workdir={tmp_path / 'mistyped'}"], [f"no checkpoints in --workdir="
                                                                     f"{tmp_path / 'mistyped'}"]),
        (eval_main, [custom, f"--workdir={trained}", "--step=5"], ["no checkpoint of step 5 in",
                                                                   "saved steps: 2 (--step=N"]),
    ]
    for main, argv, hints in cases:
        workdir = [] if any(a.startswith("--workdir") for a in argv) else [f"--workdir={tmp_path / 'run'}"]
        code, _, err = run_in_process(main, [*argv, *workdir], capsys)
        assert_one_line_error(code, err, "clipjax-eval" if main is eval_main else "clipjax-train", *hints)
    assert not (tmp_path / "mistyped").exists()  # a mistyped workdir is not created


def test_step_time_leaves_out_saves_and_evaluations_also_on_the_final_line(data_dir, tmp_path, monkeypatch):
    """On a clock where each step takes 1 s (charged when its metrics are fetched: the fetch waits for
    the step) and each evaluation 100 s, every logged step_time is 1 s: never the evaluation's time
    (the final line), never negative or near zero (the lines after an evaluation or a save)."""
    import types

    import clipjax.train as train_mod

    now = [0.0]
    monkeypatch.setattr(train_mod, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    fetch = train_mod._to_host

    def one_second_steps(metrics):
        now[0] += 1.0
        return fetch(metrics)

    monkeypatch.setattr(train_mod, "_to_host", one_second_steps)

    def slow_evaluation(step, state, writer, final=False):
        now[0] += 100.0

    run = str(tmp_path / "run")
    train(no_evals(smoke(data_dir, "--config.train.steps=5", "--config.checkpoint.every=2",
                         "--config.checkpoint.async_save=false")), run,
          evaluate_fn=slow_evaluation)
    rows = [r for r in read_metrics(os.path.join(run, "metrics.jsonl")) if "train/step_time" in r]
    assert [(r["step"], r["train/step_time"]) for r in rows] == [(s, 1.0) for s in range(1, 6)]
    assert all(r["train/samples_per_sec"] == 32.0 for r in rows)
