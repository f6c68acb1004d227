"""Real multi-process runs through launch/local.sh: gloo CPU collectives on localhost.

Two processes with 4 simulated devices each form one 8-device mesh; they must
train exactly like one process with 8 devices, hand checkpoints to and from a
one-process run on another mesh, and exit promptly when one of them dies.
"""

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from clipjax import checkpoint as ckpt_lib
from clipjax.report import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.py")
LAUNCH = str(ROOT / "launch" / "local.sh")
BIN = os.path.dirname(sys.executable)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # Generated once up front: concurrent processes must not race to write it.
    from clipjax.config import load_config
    from clipjax.data import synth

    path = str(tmp_path_factory.mktemp("synthetic"))
    synth.ensure_synthetic(path, load_config(f"{DEMO}:smoke,data={path}").data.synth)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flags(workdir, data_dir, steps, *extra):
    return [f"--config={DEMO}:smoke,data={data_dir}", f"--workdir={workdir}", f"--config.train.steps={steps}",
            "--config.checkpoint.every=4", "--config.checkpoint.async_save=false", "--config.evals.synthetic_zeroshot.every=0",
            # A constant schedule after warmup: runs of different lengths take the same steps.
            "--config.optim.schedule=constant", *extra]


def _env():
    return dict(os.environ, CLIPJAX_BIN=BIN, PYTHONUNBUFFERED="1")


def run_local(n, workdir, data_dir, steps, *extra, timeout=600):
    cmd = ["bash", LAUNCH, str(n), "--devices_per_process=4", f"--port={_free_port()}", "--",
           *_flags(workdir, data_dir, steps, *extra)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()[-4000:]


def run_single(workdir, data_dir, steps, *extra):
    env = dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([f"{BIN}/clipjax-train", *_flags(workdir, data_dir, steps, *extra)], env=env,
                          capture_output=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()[-4000:]


def losses_of(workdir):
    return {r["step"]: r["train/loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if "train/loss" in r}


def assert_same_losses(got, want, steps):
    assert sorted(got) == list(steps), sorted(got)
    for s in steps:
        assert got[s] == pytest.approx(want[s], rel=1e-5), (s, got[s], want[s])


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """One process, 8 devices, 12 uninterrupted steps."""
    ref = str(tmp_path_factory.mktemp("ref"))
    run_single(ref, data_dir, 12)
    return losses_of(ref)


def test_two_processes_train_like_one(data_dir, reference, tmp_path):
    run = str(tmp_path / "run")
    # Both processes generate this (deterministic) synthetic dataset at once: no clashes.
    run_local(2, run, str(tmp_path / "fresh_synthetic"), 8)
    assert_same_losses(losses_of(run), reference, range(1, 9))
    # Each process wrote its own data-iterator state; together they read the global stream.
    states = ckpt_lib.Checkpointer(run, every=4, keep=3).data_states(8)
    assert len(states) == 2 and all(s["position"] == 8 * 16 for s in states)


def test_checkpoints_move_between_process_counts_and_meshes(data_dir, reference, tmp_path):
    # 2 processes (data 4 x fsdp 2) -> 1 process (data 2 x fsdp 4), and the reverse.
    a = str(tmp_path / "a")
    run_local(2, a, data_dir, 8)
    run_single(a, data_dir, 12, "--config.mesh.data=2", "--config.mesh.fsdp=4")
    assert_same_losses(losses_of(a), reference, range(1, 13))
    b = str(tmp_path / "b")
    run_single(b, data_dir, 8, "--config.mesh.data=8", "--config.mesh.fsdp=1")
    run_local(2, b, data_dir, 12)
    assert_same_losses(losses_of(b), reference, range(1, 13))


def _signal_process_1(run, data_dir, sig, ready, *, wait_s, exit_within_s):
    """Launches two processes training into ``run``, waits until ``ready()`` gives a value, sends
    ``sig`` to process 1 and waits for the launch to end: (that value, exit status, stderr)."""
    port = _free_port()
    cmd = ["bash", LAUNCH, "2", "--devices_per_process=4", f"--port={port}", "--",
           *_flags(run, data_dir, 100000, "--config.train.log_every=1")]
    launcher = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
    deadline = time.time() + wait_s
    while (seen := ready()) is None and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.5)
    victim = subprocess.run(["pgrep", "-f", f"127.0.0.1:{port} .*--process_id=1"], capture_output=True,
                            text=True).stdout.split()
    if seen is None or not victim:
        ended = launcher.poll() is not None
        os.killpg(launcher.pid, signal.SIGKILL)
        why = ("the launch ended before the run was ready" if ended else
               "process 1 not found" if seen is not None else f"the run was not ready after {wait_s} s")
        pytest.fail(f"{why}\n{_launch_logs(launcher.communicate()[1].decode())}")
    os.kill(int(victim[0]), sig)
    try:
        _, err = launcher.communicate(timeout=exit_within_s)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        pytest.fail(f"the launch did not end within {exit_within_s} s of process 1 getting signal {sig}\n"
                    f"{_launch_logs(launcher.communicate()[1].decode())}")
    return seen, launcher.returncode, err.decode()


def _launch_logs(stderr: str) -> str:
    """The launcher's stderr and the tail of each process's log, for a failure message."""
    parts = [stderr[-2000:]]
    for logdir in re.findall(r"logs in (\S+)", stderr)[:1]:
        for log in sorted(pathlib.Path(logdir).glob("process_*.log")):
            parts.append(f"--- {log.name}\n" + log.read_text(errors="replace")[-3000:])
    return "\n".join(parts)


def _last_logged_step(run):
    """The last step in metrics.jsonl once two are there (else None)."""
    path = os.path.join(run, "metrics.jsonl")
    steps = losses_of(run) if os.path.exists(path) else {}
    return max(steps) if len(steps) >= 2 else None


def test_a_dead_process_ends_the_launch_and_a_rerun_resumes(data_dir, tmp_path):
    run = str(tmp_path / "run")
    checkpoints = ckpt_lib.Checkpointer(run, every=4, keep=3)
    _, code, err = _signal_process_1(run, data_dir, signal.SIGKILL, checkpoints.latest_step,
                                     wait_s=600, exit_within_s=60)
    assert code != 0
    assert "process 1 exited" in err
    saved = checkpoints.latest_step()
    time.sleep(1)  # let the killed survivors' ports close
    run_local(2, run, data_dir, saved + 4)
    assert max(losses_of(run)) == saved + 4


_SLOW_THEN_FAILING = """#!{python}
import sys, time
if "--process_id=1" in sys.argv:  # process 1 only: a slow start, then an error at its third step
    from clipjax import mfu, train
    peak, to_host, fetched = mfu.peak_flops_per_device, train._to_host, []

    def slow_peak(*args, **kwargs):
        time.sleep(45)  # longer than gloo waits for a group's first collective (30 s)
        return peak(*args, **kwargs)

    def failing_to_host(metrics):
        fetched.append(1)
        if len(fetched) == 3:
            open({failed_at!r}, "w").write(str(time.time()))
            raise RuntimeError("injected failure in process 1")
        return to_host(metrics)

    mfu.peak_flops_per_device, train._to_host = slow_peak, failing_to_host
from clipjax.main import train_main
train_main()
"""


def test_a_slow_start_is_waited_for_and_an_error_in_one_process_ends_the_launch_at_once(data_dir, tmp_path):
    """Process 1 starts 45 s after process 0 and then raises: the first steps wait for it (a
    barrier, not gloo's 30 s), and the error exits at once, not after the 5-minute shutdown barrier."""
    bin_dir, run, failed_at = tmp_path / "bin", str(tmp_path / "run"), tmp_path / "failed_at"
    bin_dir.mkdir()
    wrapper = bin_dir / "clipjax-train"
    wrapper.write_text(_SLOW_THEN_FAILING.format(python=sys.executable, failed_at=str(failed_at)))
    wrapper.chmod(0o755)
    cmd = ["bash", LAUNCH, "2", "--devices_per_process=4", f"--port={_free_port()}", "--",
           *_flags(run, data_dir, 100000, "--config.train.log_every=1")]
    proc = subprocess.run(cmd, env=dict(_env(), CLIPJAX_BIN=str(bin_dir)), capture_output=True, timeout=900)
    ended_at = time.time()
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "process 1 exited with status 1" in err, _launch_logs(err)
    assert "injected failure in process 1" in err
    assert max(losses_of(run)) >= 2  # both processes stepped together after the slow start
    assert ended_at - float(failed_at.read_text()) < 60


def test_sigterm_to_one_process_stops_every_process_at_the_same_saved_step(data_dir, tmp_path):
    """A pod's scheduler may signal one host: all hosts must still save one common step and exit 0."""
    run = str(tmp_path / "run")
    signalled_after, code, err = _signal_process_1(run, data_dir, signal.SIGTERM, lambda: _last_logged_step(run),
                                                   wait_s=600, exit_within_s=240)
    assert code == 0, err[-4000:]
    saved = ckpt_lib.Checkpointer(run, every=4, keep=3).latest_step()
    assert saved > signalled_after and saved == max(losses_of(run))
    # Both processes wrote their data-iterator state at that same step.
    states = ckpt_lib.Checkpointer(run, every=4, keep=3).data_states(saved)
    assert len(states) == 2 and all(s["position"] == saved * 16 for s in states), states
