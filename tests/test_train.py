"""End-to-end training: loss falls, exact resume after SIGKILL, SIGTERM, faults, mesh changes."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from clipjax import checkpoint as ckpt_lib
from clipjax.report import read_metrics
from clipjax.train import NonFiniteError, train
from helpers import DEMO, final_params, losses_of, smoke


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def test_loss_falls_on_learnable_data(data_dir, tmp_path):
    c = smoke(data_dir, "--config.train.steps=120", "--config.train.log_every=10", "--config.optim.lr=5e-3",
              "--config.checkpoint.every=120", "--config.evals.synthetic_zeroshot.every=0")
    train(c, str(tmp_path))
    losses = losses_of(str(tmp_path))
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < 0.75 * first, losses
    rows = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    keys = set().union(*rows)
    for key in ("train/loss", "train/lr", "train/scale", "train/grad_norm", "train/samples_per_sec",
                "train/step_time", "train/mfu", "train/hfu", "train/i2t_acc", "train/t2i_acc"):
        assert key in keys, key


@pytest.mark.slow
def test_checkpoint_restores_on_another_mesh_and_continues_identically(data_dir, tmp_path, devices):
    ref_dir, dir_a = str(tmp_path / "ref"), str(tmp_path / "a")
    train(smoke(data_dir, "--config.train.steps=6", "--config.checkpoint.every=3"), ref_dir)
    # First half on 8 devices (data=4 x fsdp=2), second half on 1 device.
    train(smoke(data_dir, "--config.train.steps=3", "--config.checkpoint.every=3"), dir_a)
    state = train(smoke(data_dir, "--config.train.steps=6", "--config.checkpoint.every=3",
                        "--config.mesh.data=1", "--config.mesh.fsdp=1"), dir_a, devices=devices[:1])
    ref, got = losses_of(ref_dir), losses_of(dir_a)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4, 5, 6]
    for step in ref:
        np.testing.assert_allclose(got[step], ref[step], rtol=1e-5)
    assert int(state.step) == 6


def test_nonfinite_steps_stop_the_run_and_keep_the_last_checkpoint(data_dir, tmp_path, monkeypatch):
    from clipjax import train as train_lib
    from clipjax.train import _default_data_iterator

    class Poisoned:
        """The real pipeline, with NaN images from step 4 on."""

        def __init__(self, config, mesh):
            self.inner, self.n = _default_data_iterator(config, mesh), 0

        def __next__(self):
            batch = next(self.inner)
            self.n += 1
            if self.n > 4:
                with jax.transfer_guard("allow"):  # the poison is an implicit upload, which the loop's guard refuses
                    batch["image_box"] = batch["image_box"] * np.nan  # NaN crop -> NaN images
            return batch

        def __getattr__(self, name):  # num_skipped, save_args, restore_args ...
            return getattr(self.inner, name)

    fetched = []
    monkeypatch.setattr(train_lib, "_to_host", lambda m, real=train_lib._to_host: fetched.append(sorted(m)) or real(m))
    # Steps 5, 6, 7 are non-finite; 6 and 7 are not logged, and the run still stops at 7.
    c = smoke(data_dir, "--config.train.steps=20", "--config.checkpoint.every=4",
              "--config.train.max_consecutive_skips=3", "--config.train.log_every=5")
    with pytest.raises(NonFiniteError, match="3 consecutive non-finite steps up to step 7 "):
        train(c, str(tmp_path), data_iterator_fn=Poisoned)
    # Steps that are not logged bring only the health checks' numbers to the host.
    assert [keys == sorted(train_lib._HEALTH_KEYS) for keys in fetched] == [True] * 4 + [False, True, True]
    ck = ckpt_lib.Checkpointer(str(tmp_path), every=4, keep=2)
    assert ck.latest_step() in (4, 8)
    rows = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert any(r.get("train/skipped_steps", 0) >= 1 for r in rows)


def test_unwritable_workdir_fails_clearly(data_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # Without the up-front check this fails later, in orbax, with a NotADirectoryError.
    with pytest.raises(ckpt_lib.WorkdirError, match=r"workdir '.*file/run' is not a writable directory"):
        train(smoke(data_dir), str(blocker / "run"))


def test_incompatible_checkpoint_fails_at_start(data_dir, tmp_path):
    train(smoke(data_dir, "--config.train.steps=2", "--config.checkpoint.every=2"), str(tmp_path))
    with pytest.raises(ckpt_lib.IncompatibleCheckpoint, match="model"):
        train(smoke(data_dir, "--config.train.steps=4", "--config.model.embed_dim=48"), str(tmp_path))


def test_init_from_starts_from_another_runs_params(data_dir, tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    trained = train(smoke(data_dir, "--config.train.steps=2", "--config.checkpoint.every=2"), src)
    # A vanishing lr (decay is scaled by it too): the fine-tuning run ends where it started.
    tuned = train(smoke(data_dir, "--config.train.steps=1", "--config.optim.lr=1e-30", "--config.optim.warmup_steps=0",
                        f"--config.checkpoint.init_from={src}"), dst)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-20),
                 jax.device_get(tuned.params), jax.device_get(trained.params))
    with pytest.raises(ckpt_lib.IncompatibleCheckpoint, match="init_from"):
        train(smoke(data_dir, "--config.train.steps=1", "--config.model.embed_dim=48",
                    f"--config.checkpoint.init_from={src}"), str(tmp_path / "other"))


# ---------------------------------------------------------------- subprocess runs


def _cli(workdir, data_dir, *extra):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-c", "from clipjax.main import train_main; train_main()",
           f"--config={DEMO}:smoke,data={data_dir}", f"--workdir={workdir}", *extra]
    return cmd, env


@pytest.mark.slow
def test_sigkill_then_restart_equals_uninterrupted_run(data_dir, tmp_path):
    extra = ["--config.train.steps=12", "--config.checkpoint.every=4", "--config.checkpoint.async_save=false"]
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    cmd, env = _cli(ref, data_dir, *extra)
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
    cmd, env = _cli(run, data_dir, *extra, "--config.train.log_every=1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill hard once a checkpoint exists and a few later steps were logged.
    deadline = time.time() + 600
    while time.time() < deadline:
        steps = losses_of(run) if os.path.exists(os.path.join(run, "metrics.jsonl")) else {}
        if steps and max(steps) >= 6:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt_lib.Checkpointer(run, every=4, keep=3).latest_step() in (4, 8)
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
    ref_losses, run_losses = losses_of(ref), losses_of(run)
    assert sorted(run_losses) == sorted(ref_losses) == list(range(1, 13))
    assert run_losses == ref_losses  # bitwise on CPU
    (s1, p1), (s2, p2) = final_params(ref), final_params(run)
    assert s1 == s2 == 12
    jax.tree.map(np.testing.assert_array_equal, p1, p2)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_or_ctrl_c_saves_the_current_step(data_dir, tmp_path, signum):
    run = str(tmp_path / "run")
    cmd, env = _cli(run, data_dir, "--config.train.steps=100000", "--config.checkpoint.every=1000",
                    "--config.train.log_every=1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline:
        if os.path.exists(os.path.join(run, "metrics.jsonl")) and len(losses_of(run)) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]
    step = ckpt_lib.Checkpointer(run, every=1000, keep=3).latest_step()
    logged = max(losses_of(run))
    assert step is not None and step >= 3 and step >= logged


def _zeroshot_by_hand(config, params, data_dir):
    """Top-1/5 on the synthetic held-out split without the evaluator: one device, every
    image at once, prompts ensembled and ranked in numpy (ties count against the image)."""
    import grain

    from clipjax.data import records, resize, synth, transforms
    from clipjax.data.tokenizer import get_tokenizer
    from clipjax.models import CLIP, build_model

    m, model = config.model, build_model(config.model)
    source = grain.sources.ArrayRecordDataSource(records.shard_paths(data_dir, "heldout"))
    examples = [records.decode(source[i]) for i in range(len(source))]
    opts = transforms.ImageOptions.from_config(config.data, m.image.image_size)
    crops = transforms.batch_regions([transforms.eval_image(e.image, opts) for e in examples], opts.buffer_size)
    images = resize.model_images(crops, m.image.image_size, config.data.interpolation)
    ids = get_tokenizer("bytes", context_length=m.text.context_length)(
        [t.format(name) for name in synth.CLASSES for t in synth.TEMPLATES])

    def embed(x, method):
        return np.asarray(model.apply({"params": params}, x, method=method), np.float64)

    unit = lambda z: z / np.linalg.norm(z, axis=-1, keepdims=True)
    zcls = unit(unit(embed(ids, CLIP.encode_text).reshape(len(synth.CLASSES), len(synth.TEMPLATES), -1)).mean(1))
    sims = embed(images, CLIP.encode_image) @ zcls.T
    labels = np.asarray([e.label for e in examples])
    ranks = (sims >= sims[np.arange(len(labels)), labels][:, None]).sum(1)
    return {"top1": float(np.mean(ranks <= 1)), "top5": float(np.mean(ranks <= 5))}


def test_standalone_eval_matches_the_in_training_eval(data_dir, tmp_path):
    from clipjax.evaluate import evaluate

    c = smoke(data_dir, "--config.train.steps=4", "--config.checkpoint.every=2")
    train(c, str(tmp_path))
    rows = [r for r in read_metrics(os.path.join(tmp_path, "metrics.jsonl")) if r["step"] == 4]
    logged = {k: v for r in rows for k, v in r.items()
              if k.startswith(("zeroshot/", "retrieval/")) and isinstance(v, (int, float))}
    assert "zeroshot/synthetic_zeroshot/top1" in logged and "retrieval/synthetic_retrieval/t2i_r1" in logged
    by_hand = _zeroshot_by_hand(c, final_params(str(tmp_path))[1], data_dir)
    assert {k: logged[f"zeroshot/synthetic_zeroshot/{k}"] for k in by_hand} == pytest.approx(by_hand, abs=1e-9)
    got = evaluate(smoke(data_dir, "--config.train.steps=4", "--config.checkpoint.every=2"), str(tmp_path))
    for key, value in logged.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    saved = json.load(open(tmp_path / "eval_4.json"))
    assert saved["step"] == 4 and saved["metrics"]["zeroshot/synthetic_zeroshot/top1"] == pytest.approx(
        logged["zeroshot/synthetic_zeroshot/top1"])
    assert "zeroshot/synthetic_zeroshot/top1" in (tmp_path / "eval_4.md").read_text()
    evaluate(smoke(data_dir), str(tmp_path), step=2)  # an older step on request
    assert json.load(open(tmp_path / "eval_2.json"))["step"] == 2
    # Overrides that change the numbers write beside the run's results, named by what differs.
    own = (tmp_path / "eval_4.json").read_text()
    other = evaluate(smoke(data_dir, "--config.evals.synthetic_retrieval.max_examples=16"), str(tmp_path))
    assert (tmp_path / "eval_4.json").read_text() == own
    saved = json.load(open(tmp_path / "eval_4-evals.synthetic_retrieval.max_examples=16.json"))
    assert saved["differs_from_run"] == {"evals.synthetic_retrieval.max_examples": [64, 16]}
    assert saved["metrics"]["retrieval/synthetic_retrieval/num_images"] == 16 == other[
        "retrieval/synthetic_retrieval/num_images"]
