"""The training loop: resume, step, log, checkpoint, evaluate, report.

The host loop stays asynchronous: step N+1 is dispatched before step N's
metrics are fetched, and that explicit fetch is the loop's one device-to-host
transfer. The loop runs under ``jax.transfer_guard("disallow")``: an implicit
transfer (``float(loss)``, a batch left in numpy) fails loudly instead of
stalling every step; saves and evaluations are allowed theirs.
Checkpoints hold the train state and the data iterator together, so a killed run
resumes exactly where its last checkpoint was taken. A step is saved only after
its own metrics show it healthy: never inside a run of non-finite steps, and the
newest checkpoint from before such a run is kept whatever ``checkpoint.keep``
says. A step is saved before it is evaluated: a failing evaluation never costs
trained steps. One run per workdir: ``WORKDIR/.lock`` (``clipjax.lock``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
import optax

from clipjax import checkpoint as ckpt_lib
from clipjax import config_diff, distributed, hlo_flops
from clipjax import metrics as metrics_lib
from clipjax import mfu as mfu_lib
from clipjax import preemption
from clipjax import run, stages
from clipjax.errors import UserError
from clipjax.lock import FolderBusy, FolderLock
from clipjax.models import count_params
from clipjax.train_step import TrainState, compile_train_step, init_state

log = logging.getLogger("clipjax")


class NonFiniteError(UserError, RuntimeError):
    """Too many consecutive non-finite steps; the last good checkpoint is intact."""


class LossSpikeError(UserError, RuntimeError):
    """The loss jumped far above its running mean (``train.loss_spike_factor``); the run stopped unsaved."""


def _default_data_iterator(config, mesh) -> Any:
    from clipjax.data import train_data
    from clipjax.data.locca import DecoderTargets

    return train_data.make_train_iterator(
        config.data, global_batch_size=config.train.batch_size, image_size=config.model.image.image_size,
        context_length=config.model.text.context_length, seed=config.seed, mesh=mesh,
        decoder=DecoderTargets.from_config(config), seq_len=config.model.image.seq_len,
        patch_size=config.model.image.patch_size)


def _switch_data(old, new):
    """``new`` continues ``old``'s stream at the next unread example (a stage changed the sizes)."""
    new.set_state(old.get_state())
    if hasattr(old, "close"):
        old.close()
    return new


# The health checks' numbers, fetched every step; the other metrics only on logged steps.
_HEALTH_KEYS = ("train/finite", "train/consecutive_skips", "train/loss")


def _to_host(metrics: dict[str, Any]) -> dict[str, float]:
    """The loop's one device-to-host transfer per step (explicit: the transfer guard lets it pass)."""
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """Holds ``WORKDIR/.lock`` for the run (process 0 takes it; every process stops if it is taken)."""
    lock = FolderLock(os.path.join(workdir, ".lock"), what=f"workdir {workdir}",
                      fix="wait for that run to end (or stop it), or choose another --workdir")
    busy = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except FolderBusy as e:
            busy = e
    if distributed.is_multiprocess() and not distributed.all_true(busy is None):
        raise busy or FolderBusy(f"workdir {workdir} is in use by another run (process 0 could not lock it)")
    if busy is not None:
        raise busy
    try:
        yield
    finally:
        lock.release()


class StepPrograms:
    """The compiled step of each phase, with its FLOPs per device (model: analytic, no recomputation,
    for MFU; compiled: what XLA executes, for HFU)."""

    def __init__(self, config, setup) -> None:
        self.config, self.setup = config, setup
        self._cache: dict[stages.Phase, tuple[Any, float, Any]] = {}

    def __call__(self, phase: stages.Phase) -> tuple[Any, float, Any]:
        if phase not in self._cache:
            executable = compile_train_step(self.setup, phase)
            phase_model = stages.data_config(self.config, phase).model
            model_flops = mfu_lib.clip_train_flops(phase_model, self.config.train.batch_size) / self.setup.mesh.size
            self._cache[phase] = (executable, model_flops, hlo_flops.compiled_flops(executable))
        return self._cache[phase]


class StepClock:
    """Seconds per step between two logged steps' fetches (a fetch returns when its step has run),
    without the time spent saving and evaluating (``exclude``): that is not step time for samples/s
    and MFU."""

    def __init__(self, start_step: int) -> None:
        self._start, self._step, self._excluded = time.perf_counter(), start_step, 0.0

    def exclude(self, seconds: float) -> None:
        self._excluded += seconds

    def lap(self, step: int) -> float:
        """Seconds per step since the previous lap (or the start), ``step`` just fetched."""
        now = time.perf_counter()
        dt = (now - self._start - self._excluded) / max(step - self._step, 1)
        self._start, self._step, self._excluded = now, step, 0.0
        return dt


class Health:
    """Stops a diverging run: too many non-finite steps in a row, or a loss spike."""

    def __init__(self, config, checkpointer, newest_saved: Callable[..., str]) -> None:
        self.max_skips = config.train.max_consecutive_skips
        self.spike_factor = config.train.loss_spike_factor
        self.recent = collections.deque(maxlen=config.train.loss_spike_window)
        self.checkpointer, self.newest_saved = checkpointer, newest_saved
        self.skipping = False  # inside a run of non-finite steps: nothing is saved

    def check(self, step: int, host: dict[str, float]) -> None:
        finite = bool(host["train/finite"])
        if not finite and not self.skipping:
            pinned = self.checkpointer.pin_newest()  # retention must not delete the last good state
            if pinned is not None:
                log.warning("step %d: non-finite; checkpoint step %d is kept until the run ends", step, pinned)
        self.skipping = not finite
        skips = int(host["train/consecutive_skips"])
        if skips >= self.max_skips:
            self.checkpointer.wait()
            raise NonFiniteError(
                f"{skips} consecutive non-finite steps up to step {step} (train.max_consecutive_skips="
                f"{self.max_skips}); weights were not updated by them; restart from {self.newest_saved()}, "
                "e.g. with a lower optim.lr")
        if not finite:
            log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step, skips)
        elif self.spike_factor > 0:
            self._check_spike(step, host["train/loss"])

    def _check_spike(self, step: int, loss: float) -> None:
        mean = sum(self.recent) / max(len(self.recent), 1)
        if len(self.recent) == self.recent.maxlen and loss > self.spike_factor * mean:
            self.checkpointer.wait()
            # The loss of step N measures the weights updated by step N-1: those are suspect too.
            raise LossSpikeError(
                f"step {step}: loss {loss:.4g} is over train.loss_spike_factor={self.spike_factor:g} times its mean "
                f"{mean:.4g} over the previous {len(self.recent)} steps, measured on the weights of step "
                f"{step - 1}; stopped without saving; restart from {self.newest_saved(before=step - 1)}, "
                f"e.g. with a lower optim.lr")
        self.recent.append(loss)


class Profile:
    """``train.profile_steps="A:B"``: a jax.profiler trace of steps A..B-1 in ``WORKDIR/profile``
    (TensorBoard's profile plugin or Perfetto open it); each step is a ``StepTraceAnnotation``."""

    def __init__(self, spec: str, workdir: str) -> None:
        self.first, self.stop = (int(x) for x in spec.split(":")) if spec else (-1, -1)
        self.folder, self.active = os.path.join(workdir, "profile"), False

    def step(self, step: int, state) -> contextlib.AbstractContextManager:
        """Wraps the dispatch of ``step`` (0-based); starts and ends the trace at its bounds."""
        if step == self.first and not self.active:
            jax.profiler.start_trace(self.folder, create_perfetto_trace=True)
            self.active = True
        if self.active and step >= self.stop:
            self.end(state)
        return jax.profiler.StepTraceAnnotation("train", step_num=step) if self.active else contextlib.nullcontext()

    def end(self, state) -> None:
        if self.active:
            jax.block_until_ready(state)  # the traced steps' device work belongs in the trace
            jax.profiler.stop_trace()
            self.active = False
            log.info("profile of steps %d-%d written to %s", self.first, self.stop - 1, self.folder)


def train(config, workdir: str, *, data_iterator_fn: Callable[[Any, Any], Iterator] | None = None,
          evaluate_fn: Callable | None = None, devices=None) -> TrainState:
    """Trains ``config`` in ``workdir`` (auto-resuming) and returns the final state.

    ``data_iterator_fn(config, mesh)`` (default: the grain stream) returns an iterator of
    global batches with ``num_skipped``, ``save_args()``, ``restore_args()`` and
    ``set_state_from_processes(states)``, as ``train_input.TrainIterator`` has.

    ``devices`` (default: all) restricts the mesh, e.g. to compare meshes in one process.
    """
    setup, checkpointer = run.prepare(config, workdir, devices)
    with workdir_lock(workdir):
        return Run(config, workdir, setup, checkpointer, data_iterator_fn or _default_data_iterator,
                   evaluate_fn).train()


class Run:
    """One call of ``train``: start-up (resume or init, compile), the step loop, the end."""

    def __init__(self, config, workdir: str, setup, checkpointer, make_data, evaluate_fn) -> None:
        self.config, self.workdir, self.setup, self.checkpointer = config, workdir, setup, checkpointer
        self.make_data, self.is_main = make_data, jax.process_index() == 0
        self.writer = metrics_lib.MetricWriter(workdir, enabled=self.is_main, total_steps=config.train.steps)
        self.progress = self.writer.progress  # start-up says what it is doing: the minute before step 1 is not silent
        self.programs = StepPrograms(config, setup)
        self.health = Health(config, checkpointer, self.newest_saved)
        self.profile = Profile(config.train.profile_steps, workdir)
        self.evaluate = evaluate_fn
        self.param_norm = jax.jit(optax.global_norm)

    def newest_saved(self, before: int | None = None) -> str:
        """The newest checkpoint (older than step ``before``), said as a place to restart from."""
        steps = [s for s in self.checkpointer.manager.all_steps() if before is None or s < before]
        return (f"step {max(steps)} in {self.workdir}/checkpoints" if steps
                else f"scratch (no such checkpoint in {self.workdir}/checkpoints)")

    # -- start-up --

    def _open_data(self, phase: stages.Phase):
        return self.make_data(stages.data_config(self.config, phase), self.setup.mesh)

    def _restore(self, step: int, data_iter) -> TrainState:
        saved = self.checkpointer.saved_config(step)
        if saved is not None:
            changed = config_diff.check_resume(saved, self.config.to_json(), step=step,
                                               accept_changes=self.config.checkpoint.accept_changes)
            if changed and self.is_main:
                log.warning("resuming step %d with %d changed config field(s): %s", step, len(changed),
                            "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        return run.restore(self.checkpointer, self.setup, step, data_iter)

    def _resume_or_init(self, data_iter) -> TrainState:
        """The newest intact checkpoint's state (``data_iter`` continues its stream), else a new one."""
        if self.checkpointer.latest_step() is not None:
            with self.progress.phase("restoring the newest intact checkpoint in "
                                     f"{ckpt_lib.checkpoint_dir(self.workdir)}"):
                resumed = self.checkpointer.restore_newest_intact(
                    lambda step: self._restore(step, data_iter),
                    start_over=self.config.checkpoint.start_over_if_damaged)
            if resumed is not None:
                log.info("resumed from step %d in %s", resumed[0], self.workdir)
                return resumed[1]
            log.warning("every checkpoint was damaged; starting again from step 0 "
                        "(checkpoint.start_over_if_damaged)")
        init_from = self.config.checkpoint.init_from
        with self.progress.phase("initialising the parameters" + (f" from {init_from}" if init_from else "")):
            params = None
            if init_from:
                params = ckpt_lib.load_params(init_from, self.setup.abstract_state.params,
                                              init_logit_bias=self.config.model.init_logit_bias)
            return init_state(self.setup, self.config.seed, params)

    def _start(self):
        """(state, first step, phase, data iterator, compiled step), everything logged and checked."""
        latest = self.checkpointer.latest_step()
        # The pipeline ships the current phase's image size and text length (train.stages).
        phase = stages.phase_at(self.config, latest or 0)
        with self.progress.phase("opening the training data"):
            data_iter = self._open_data(phase)
        if self.evaluate is None and len(self.config.evals):
            from clipjax.evals.evaluator import Evaluator

            with self.progress.phase("checking the evaluations"):  # a bad class list fails now, not at the end
                self.evaluate = Evaluator(self.config, self.setup)
        state = self._resume_or_init(data_iter)
        start = int(jax.device_get(state.step))
        start_phase = stages.phase_at(self.config, start)  # differs from ``phase`` when resumed from an older step
        if start_phase.input_sizes != phase.input_sizes:
            data_iter = _switch_data(data_iter, self._open_data(start_phase))
        with self.progress.phase("compiling the train step"):
            compiled, model_flops, flops = self.programs(start_phase)
        self.peak, peak_source = mfu_lib.peak_flops_per_device(self.setup.mesh.devices.flat[0], self.config.model.dtype)
        self.writer.truncate_after(start)
        if self.is_main:
            log.info("mesh %s; %d params; step FLOPs/device: model %.4g, compiled %s; peak %.3g FLOP/s (%s)",
                     dict(self.setup.mesh.shape), count_params(state.params), model_flops, flops, self.peak,
                     peak_source)
        return state, start, start_phase, data_iter, compiled

    # -- the loop --

    def _log(self, step: int, metrics: dict, force: bool = False) -> None:
        """Fetches step ``step``'s metrics, checks its health, and writes them on logged steps."""
        logged = force or step % self.config.train.log_every == 0
        host = _to_host(metrics if logged else {k: metrics[k] for k in _HEALTH_KEYS})
        self.health.check(step, host)
        if not logged:
            return
        _, model_flops, flops = self.programs(stages.phase_at(self.config, step - 1))
        dt = self.clock.lap(step)
        host["train/step_time"] = dt
        host["train/samples_per_sec"] = self.config.train.batch_size / dt
        host["train/mfu"] = mfu_lib.mfu(model_flops, dt, self.peak)
        if flops:
            host["train/hfu"] = mfu_lib.mfu(flops, dt, self.peak)
        host.pop("train/finite")
        self.writer.write(step, host)

    def _save_and_evaluate(self, done: int, state, data_iter, save: bool) -> None:
        """Saves ``done`` (when due and healthy), then evaluates it: an evaluation that fails costs no step."""
        total = self.config.train.steps
        with jax.transfer_guard("allow"):
            if save and self.health.skipping:
                log.warning("step %d: not saved inside a run of non-finite steps; newest checkpoint: %s", done,
                            self.newest_saved())
            elif save:
                self.checkpointer.save(done, state, data_iter.save_args())
            if self.evaluate is not None:
                try:
                    self.evaluate(done, state, self.writer, final=done == total)
                except UserError as e:
                    raise type(e)(f"{e} (evaluating step {done}; newest checkpoint: {self.newest_saved()}; "
                                  "after the fix, clipjax-eval evaluates it)") from e

    def train(self) -> TrainState:
        config, total = self.config, self.config.train.steps
        state, start, phase, data_iter, compiled = self._start()
        stop = preemption.StopRequest(start)
        self.clock = StepClock(start)  # start-up is not step time
        pending: tuple[int, dict] | None = None  # (step, device metrics) not yet fetched
        run_start = time.perf_counter()
        # Compiling, measuring the peak and opening the evaluations take each process its own time.
        distributed.barrier(f"train-start-{start}")
        try:
            with jax.transfer_guard("disallow"):
                for step in range(start, total):
                    new_phase = stages.phase_at(config, step)
                    if new_phase != phase:
                        if new_phase.input_sizes != phase.input_sizes:
                            data_iter = _switch_data(data_iter, self._open_data(new_phase))
                        phase = new_phase
                        compiled = self.programs(phase)[0]
                        distributed.barrier(f"train-phase-from-step-{step}")
                        log.info("step %d: image size %d, NaFlex length %d, context length %d, mask ratio %g",
                                 step, phase.image_size, phase.seq_len, phase.context_length, phase.mask_ratio)
                    with jax.transfer_guard("allow"):  # the batch's upload: with several processes it is built here
                        batch = next(data_iter)
                    with self.profile.step(step, state):
                        state, metrics = compiled(state, batch)
                    self.checkpointer.check()  # a failed background save stops the run here, not at the next save
                    done = step + 1
                    if done % config.train.log_every == 0 or done == total:
                        # Only on logged steps: a norm is a full pass over the weights, the step stays lean.
                        metrics = dict(metrics, **{"train/param_norm": self.param_norm(state.params)})
                    metrics = dict(metrics, **{"data/skipped_examples": data_iter.num_skipped,
                                                       "data/skipped_shards": getattr(data_iter, "num_skipped_shards", 0)})
                    if pending is not None:  # fetch step N-1's metrics only after step N is dispatched
                        self._log(*pending)
                    pending = (done, metrics)
                    stopping = stop.at(done)
                    save = stopping or self.checkpointer.should_save(done) or done == total
                    if save:  # a save needs this step's health now
                        self._log(*pending, force=stopping or done == total)
                        pending = None
                    side_start = time.perf_counter()
                    self._save_and_evaluate(done, state, data_iter, save)
                    self.clock.exclude(time.perf_counter() - side_start)
                    if stopping:
                        return self._stopped(state, stop.signal_name, done)
                if pending is not None:
                    self._log(*pending, force=True)
        except BaseException:
            self._finish_saves()
            raise
        finally:
            stop.close()  # the caller's handlers come back whether the loop ends, stops or raises
            self.profile.end(state)
        self.checkpointer.close()
        self.progress.end_bar()
        self.progress.note(f"finished {total - start} steps in {time.perf_counter() - run_start:.1f}s")
        if self.is_main and config.train.report:
            from clipjax import report

            self.progress.note(f"report: {report.write_report(self.workdir)}")
        self.writer.close()
        return state

    def _stopped(self, state, signal_name: str | None, done: int) -> TrainState:
        self.checkpointer.close()
        log.warning("%s: stopped after step %d; newest checkpoint: %s", signal_name or "preemption notice", done,
                    self.newest_saved())
        self.writer.close()
        return state

    def _finish_saves(self) -> None:
        """A run that fails (an evaluation, a divergence) still completes the save in flight."""
        try:
            self.checkpointer.wait()
        except ckpt_lib.CheckpointSaveError as e:
            log.error("%s", e)
        self.writer.close()
