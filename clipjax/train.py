"""The training loop: resume, step, log, evaluate, checkpoint, report.

The host loop stays asynchronous: step N+1 is dispatched before step N's
metrics are fetched. Checkpoints hold the train state and the data iterator
together, so a killed run resumes exactly where its last checkpoint was taken.
A step is saved only after its own metrics show it healthy: never inside a run
of non-finite steps, and the newest checkpoint from before such a run is kept
whatever ``checkpoint.keep`` says.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
import optax

from clipjax import checkpoint as ckpt_lib
from clipjax import distributed
from clipjax import hlo_flops
from clipjax import metrics as metrics_lib
from clipjax import mfu as mfu_lib
from clipjax import preemption
from clipjax import run, stages
from clipjax.errors import UserError
from clipjax.models import count_params
from clipjax.train_step import TrainState, compile_train_step, init_state

log = logging.getLogger("clipjax")


class NonFiniteError(UserError, RuntimeError):
    """Too many consecutive non-finite steps; the last good checkpoint is intact."""


class LossSpikeError(UserError, RuntimeError):
    """The loss jumped far above its running mean (``train.loss_spike_factor``); the run stopped unsaved."""


def _default_data_iterator(config, mesh) -> Any:
    from clipjax.data import train_input

    return train_input.make_train_iterator(
        config.data, global_batch_size=config.train.batch_size, image_size=config.model.image.image_size,
        context_length=config.model.text.context_length, seed=config.seed, mesh=mesh,
        seq_len=config.model.image.seq_len, patch_size=config.model.image.patch_size)


def _switch_data(old, new):
    """``new`` continues ``old``'s stream at the next unread example (a stage changed the sizes)."""
    new.set_state(old.get_state())
    if hasattr(old, "close"):
        old.close()
    return new


# The health checks' numbers, fetched every step; the other metrics only on logged steps.
_HEALTH_KEYS = ("train/finite", "train/consecutive_skips", "train/loss")


def _to_host(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


def train(config, workdir: str, *, data_iterator_fn: Callable[[Any, Any], Iterator] | None = None,
          evaluate_fn: Callable | None = None, devices=None) -> TrainState:
    """Trains ``config`` in ``workdir`` (auto-resuming) and returns the final state.

    ``data_iterator_fn(config, mesh)`` (default: the grain stream) returns an iterator of
    global batches with ``num_skipped``, ``save_args()``, ``restore_args()`` and
    ``set_state_from_processes(states)``, as ``train_input.TrainIterator`` has.

    ``devices`` (default: all) restricts the mesh, e.g. to compare meshes in one process.
    """
    setup, checkpointer = run.prepare(config, workdir, devices)
    mesh, is_main = setup.mesh, jax.process_index() == 0
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main, total_steps=config.train.steps)
    progress = writer.progress  # start-up says what it is doing: the minute before step 1 is not silent
    make_data = data_iterator_fn or _default_data_iterator
    latest = checkpointer.latest_step()
    # The pipeline ships the current phase's image size and text length (train.stages).
    phase = stages.phase_at(config, latest or 0)
    with progress.phase("opening the training data"):
        data_iter = make_data(stages.data_config(config, phase), mesh)

    resumed = None
    if latest is not None:
        with progress.phase(f"restoring the newest intact checkpoint in {ckpt_lib.checkpoint_dir(workdir)}"):
            resumed = checkpointer.restore_newest_intact(
                lambda step: run.restore(checkpointer, setup, step, data_iter))
    if resumed is not None:
        state = resumed[1]
        log.info("resumed from step %d in %s", resumed[0], workdir)
    else:
        params = None
        with progress.phase("initialising the parameters" + (
                f" from {config.checkpoint.init_from}" if config.checkpoint.init_from else "")):
            if config.checkpoint.init_from:
                params = ckpt_lib.load_params(config.checkpoint.init_from, setup.abstract_state.params,
                                              init_logit_bias=config.model.init_logit_bias)
            state = init_state(setup, config.seed, params)
    start = int(jax.device_get(state.step))
    start_phase = stages.phase_at(config, start)  # differs from ``phase`` when resumed from an older checkpoint
    if start_phase.input_sizes != phase.input_sizes:
        data_iter = _switch_data(data_iter, make_data(stages.data_config(config, start_phase), mesh))
    phase = start_phase

    # phase -> (executable, model FLOPs per device, compiled FLOPs per device). MFU counts the model's
    # FLOPs (analytic, no recomputation; at the phase's sizes); HFU what the compiled step executes.
    compiled_steps: dict[stages.Phase, tuple[Any, float, Any]] = {}

    def compiled_for(phase: stages.Phase):
        if phase not in compiled_steps:
            executable = compile_train_step(setup, phase)
            phase_model = stages.data_config(config, phase).model
            model_flops = mfu_lib.clip_train_flops(phase_model, config.train.batch_size) / setup.mesh.size
            compiled_steps[phase] = (executable, model_flops, hlo_flops.compiled_flops(executable))
        return compiled_steps[phase]

    with progress.phase("compiling the train step"):
        compiled, model_flops, flops = compiled_for(phase)
    peak, peak_source = mfu_lib.peak_flops_per_device(setup.mesh.devices.flat[0], config.model.dtype)
    writer.truncate_after(start)
    if is_main:
        log.info("mesh %s; %d params; step FLOPs/device: model %.4g, compiled %s; peak %.3g FLOP/s (%s)",
                 dict(mesh.shape), count_params(state.params), model_flops, flops, peak, peak_source)
    stop = preemption.StopRequest(start)
    evaluate = evaluate_fn
    if evaluate is None and len(config.evals):
        from clipjax.evals.evaluator import Evaluator

        evaluate = Evaluator(config, setup)

    total = config.train.steps
    param_norm = jax.jit(optax.global_norm)
    pending: tuple[int, dict] | None = None  # (step, device metrics) not yet fetched
    window_start, window_steps = time.perf_counter(), 0
    run_start = time.perf_counter()
    spike_factor, recent_losses = config.train.loss_spike_factor, collections.deque(
        maxlen=config.train.loss_spike_window)
    skipping = False  # inside a run of non-finite steps: nothing is saved

    def newest_saved(before: int | None = None) -> str:
        """The newest checkpoint (older than step ``before``), said as a place to restart from."""
        steps = [s for s in checkpointer.manager.all_steps() if before is None or s < before]
        return (f"step {max(steps)} in {workdir}/checkpoints" if steps
                else f"scratch (no such checkpoint in {workdir}/checkpoints)")

    def handle(step: int, metrics: dict, force_log: bool = False) -> None:
        nonlocal window_start, window_steps, skipping
        logged = force_log or step % config.train.log_every == 0
        host = _to_host(metrics if logged else {k: metrics[k] for k in _HEALTH_KEYS})
        if not host["train/finite"] and not skipping:
            pinned = checkpointer.pin_newest()  # retention must not delete the last good state
            if pinned is not None:
                log.warning("step %d: non-finite; checkpoint step %d is kept until the run ends", step, pinned)
        skipping = not host["train/finite"]
        if host["train/consecutive_skips"] >= config.train.max_consecutive_skips:
            checkpointer.wait()
            raise NonFiniteError(
                f"{int(host['train/consecutive_skips'])} consecutive non-finite steps up to step {step} "
                f"(train.max_consecutive_skips={config.train.max_consecutive_skips}); weights were not "
                f"updated by them; restart from {newest_saved()}, e.g. with a lower optim.lr")
        if not host["train/finite"]:
            log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step,
                        int(host["train/consecutive_skips"]))
        elif spike_factor > 0:
            loss = host["train/loss"]
            mean = sum(recent_losses) / max(len(recent_losses), 1)
            if len(recent_losses) == recent_losses.maxlen and loss > spike_factor * mean:
                checkpointer.wait()
                # The loss of step N measures the weights updated by step N-1: those are suspect too.
                raise LossSpikeError(
                    f"step {step}: loss {loss:.4g} is over train.loss_spike_factor={spike_factor:g} times its mean "
                    f"{mean:.4g} over the previous {len(recent_losses)} steps, measured on the weights of step "
                    f"{step - 1}; stopped without saving; restart from {newest_saved(before=step - 1)}, "
                    f"e.g. with a lower optim.lr")
            recent_losses.append(loss)
        if not logged:
            return
        _, model_flops, flops = compiled_for(stages.phase_at(config, step - 1))
        now = time.perf_counter()
        dt = (now - window_start) / max(window_steps, 1)
        window_start, window_steps = now, 0
        host["train/step_time"] = dt
        host["train/samples_per_sec"] = config.train.batch_size / dt
        host["train/mfu"] = mfu_lib.mfu(model_flops, dt, peak)
        if flops:
            host["train/hfu"] = mfu_lib.mfu(flops, dt, peak)
        host["train/eta_sec"] = dt * (total - step)
        host.pop("train/finite")
        writer.write(step, host)

    # Compiling, measuring the peak and opening the evaluations take each process its own time.
    distributed.barrier(f"train-start-{start}")
    try:
        step = start
        for step in range(start, total):
            new_phase = stages.phase_at(config, step)
            if new_phase != phase:
                if new_phase.input_sizes != phase.input_sizes:
                    data_iter = _switch_data(data_iter, make_data(stages.data_config(config, new_phase), mesh))
                phase = new_phase
                compiled = compiled_for(phase)[0]
                distributed.barrier(f"train-phase-from-step-{step}")
                log.info("step %d: image size %d, NaFlex length %d, context length %d, mask ratio %g", step,
                         phase.image_size, phase.seq_len, phase.context_length, phase.mask_ratio)
            batch = next(data_iter)
            state, metrics = compiled(state, batch)
            checkpointer.check()  # a failed background save stops the run here, not at the next save
            if (step + 1) % config.train.log_every == 0 or step + 1 == total:
                # Only on logged steps: a norm is a full pass over the weights, the step stays lean.
                metrics = dict(metrics, **{"train/param_norm": param_norm(state.params)})
            metrics = dict(metrics, **{"data/skipped_examples": data_iter.num_skipped})
            window_steps += 1
            if pending is not None:  # fetch step N-1's metrics only after step N is dispatched
                handle(*pending)
            pending = (step + 1, metrics)
            done = step + 1
            side_start = time.perf_counter()
            if evaluate is not None:
                evaluate(done, state, writer, final=done == total)
            stopping = stop.at(done)
            if stopping or checkpointer.should_save(done) or done == total:
                handle(*pending, force_log=stopping or done == total)  # a save needs this step's health now
                pending = None
                if skipping:
                    log.warning("step %d: not saved inside a run of non-finite steps; newest checkpoint: %s", done,
                                newest_saved())
                else:
                    checkpointer.save(done, state, data_iter.save_args())
            if stopping:
                checkpointer.close()
                log.warning("%s: stopped after step %d; newest checkpoint: %s", stop.signal_name or "preemption notice",
                            done, newest_saved())
                writer.close()
                return state
            # Evaluation and checkpoint time is not step time: keep it out of step_time, samples/s and MFU.
            window_start += time.perf_counter() - side_start
        if pending is not None:
            handle(*pending, force_log=True)
    finally:
        stop.close()  # the caller's handlers come back whether the loop ends, stops or raises
    checkpointer.close()
    progress.end_bar()
    progress.note(f"finished {total - start} steps in {time.perf_counter() - run_start:.1f}s")
    if is_main and config.train.report:
        from clipjax import report

        progress.note(f"report: {report.write_report(workdir)}")
    writer.close()
    return state
