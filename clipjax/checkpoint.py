"""Checkpoints: one orbax manager saving {train state, data iterator, config} together.

Layout: ``WORKDIR/checkpoints/<step>/{state,data,config}``. Orbax writes each
step into a temporary folder and renames it when complete, so a run killed
mid-save never resumes from a partial checkpoint. State is restored straight
into the caller's shardings, whatever mesh saved it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp

from clipjax.errors import UserError

log = logging.getLogger("clipjax")

# Config fields that change parameter shapes or presence: a checkpoint is only
# compatible with a config that agrees on all of them.
SHAPE_KEYS = ("model.size", "model.embed_dim", "model.image", "model.text", "model.init_logit_bias", "model.scan",
              "loss.kind", "optim.lock_image", "optim.lock_text", "optim.clip_norm")


class IncompatibleCheckpoint(UserError, ValueError):
    """The checkpoint in the workdir was written by a config with other shapes."""


class WorkdirError(UserError, PermissionError):
    """The workdir cannot be created or written."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def check_workdir_writable(workdir: str) -> None:
    """Creates ``workdir`` and proves it writable, or fails naming it."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise WorkdirError(f"workdir {workdir!r} is not a writable directory ({e.strerror or e}); "
                           f"choose another --workdir or fix its permissions") from e


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _flatten(prefix: str, value: Any, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = value


def config_differences(saved_json: str, current_json: str, sections: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved, current)}`` for the fields under ``sections`` that differ; fields only
    one side has (newer than the checkpoint, or gone since) are not differences."""
    saved, current = json.loads(saved_json), json.loads(current_json)
    out = {}
    for section in sections:
        a, b = {}, {}
        _flatten(section, _get(saved, section), a)
        _flatten(section, _get(current, section), b)
        out.update({k: (a[k], b[k]) for k in sorted(set(a) & set(b)) if a[k] != b[k]})
    return out


def check_compatible(saved_json: str, current_json: str) -> None:
    """Raises IncompatibleCheckpoint naming every shape-relevant key that differs."""
    diffs = [f"{k}: checkpoint {a!r} vs config {b!r}"
             for k, (a, b) in config_differences(saved_json, current_json, SHAPE_KEYS).items()]
    if diffs:
        raise IncompatibleCheckpoint("the checkpoint was written by an incompatible config: " + "; ".join(diffs))


class Checkpointer:
    """Saves and restores ``{"state", "data", "config"}`` under ``WORKDIR/checkpoints``."""

    def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True,
                 config_json: str | None = None):
        self.every = int(every)
        self.config_json = config_json
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(keep), enable_async_checkpointing=bool(async_save), create=True)
        self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (orbax ignores unfinished ones)."""
        self.manager.reload()
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, state: Any, data_args: Any = None) -> bool:
        """Starts an (asynchronous) save of ``state`` and the data iterator at ``step``."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_args is not None:
            items["data"] = data_args
        if self.config_json is not None:
            items["config"] = ocp.args.JsonSave(json.loads(self.config_json))
        if step in self.manager.all_steps():
            return False
        # The caller's cadence (should_save, SIGTERM, the last step) decides; orbax always writes.
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def saved_config(self, step: int) -> str | None:
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        except Exception:  # noqa: BLE001 - a checkpoint without config is accepted
            return None
        return json.dumps(restored["config"])

    def restore(self, step: int, abstract_state: Any, data_args: Any = None) -> tuple[Any, Any]:
        """Restores ``state`` (onto ``abstract_state``'s shardings) and the data iterator."""
        if self.config_json is not None:
            saved = self.saved_config(step)
            if saved is not None:
                check_compatible(saved, self.config_json)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_args is not None:
            items["data"] = data_args
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as e:
            raise IncompatibleCheckpoint(
                f"cannot restore step {step} of {self.manager.directory} into this config's state: {e}") from e
        return restored["state"], restored.get("data") if data_args is not None else None

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the params of ``step`` (evaluation, export), onto ``abstract_params``'s shardings."""
        if self.config_json is not None:
            saved = self.saved_config(step)
            if saved is not None:
                check_compatible(saved, self.config_json)
        return load_params(os.path.join(str(self.manager.directory), str(step)), abstract_params)

    def data_states(self, step: int) -> list[dict[str, Any]]:
        """The data iterator states saved at ``step``, one per process that wrote them."""
        folder = self.manager.directory / str(step) / "data"  # an epath: local disk or a bucket
        found = {}
        for path in folder.iterdir() if folder.exists() else ():
            m = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", path.name)
            if m:
                found[int(m.group(1))] = (int(m.group(2)), json.loads(path.read_text()))
        counts = {count for count, _ in found.values()}
        if len(counts) > 1 or (counts and sorted(found) != list(range(counts.pop()))):
            names = sorted(p.name for p in folder.iterdir())
            raise IncompatibleCheckpoint(f"{folder}: data iterator files do not form one set: {names}")
        return [found[i][1] for i in sorted(found)]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _state_dir(path: str) -> str:
    """Resolves a workdir, its checkpoints/ folder, or a step folder to a ``state`` item folder."""
    path = os.path.abspath(path)
    for candidate in (path, os.path.join(path, "state")):
        if os.path.basename(candidate) == "state" and os.path.isdir(candidate):
            return candidate
    for root in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(root):
            steps = sorted(int(d) for d in os.listdir(root) if d.isdigit() and
                           os.path.isdir(os.path.join(root, d, "state")))
            if steps:
                return os.path.join(root, str(steps[-1]), "state")
    raise FileNotFoundError(f"checkpoint.init_from={path!r}: no complete checkpoint found there")


def load_params(path: str, abstract_params: Any, *, init_logit_bias: float | None = None) -> Any:
    """Params from another run's checkpoint, restored onto ``abstract_params``'s shardings.

    ``path`` may also be an OpenCLIP/OpenAI weights file (``.safetensors``, ``.bin``, ``.pt``);
    a logit bias the file lacks starts at ``init_logit_bias``.
    """
    if os.path.isfile(path):
        from clipjax.interop import openclip

        try:
            return openclip.load_params(path, abstract_params, init_logit_bias=init_logit_bias)
        except openclip.WeightsError as e:
            raise IncompatibleCheckpoint(f"checkpoint.init_from={path!r}: {e}") from e
    state_dir = _state_dir(path)
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                                               dtype=a.dtype), abstract_params)
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            state_dir, args=ocp.args.PyTreeRestore(item={"params": abstract_params},
                                                   restore_args={"params": restore_args}, partial_restore=True))
    except (ValueError, KeyError, TypeError) as e:
        raise IncompatibleCheckpoint(f"checkpoint.init_from={path!r}: params do not match this model: {e}") from e
    return restored["params"]


class PreemptionWatcher:
    """Sets ``requested`` on SIGTERM (chaining any previous handler) so the loop can save and stop."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self._event.set()
        if callable(self._previous) and self._previous not in (signal.SIG_DFL, signal.SIG_IGN):
            self._previous(signum, frame)

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def close(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous)
