"""Checkpoints: one orbax manager saving {train state, data iterator, config} together.

Layout: ``WORKDIR/checkpoints/<step>/{state,data,config}``. Orbax writes each
step into a temporary folder and renames it when complete, so a run killed
mid-save never resumes from a partial checkpoint. State is restored straight
into the caller's shardings, whatever mesh saved it. A step damaged later
(truncated or deleted files) is moved aside to ``<step>.damaged`` and the
next older step is restored instead; a failed asynchronous save stops the run
at the next step with the path it could not write.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from clipjax.errors import UserError

log = logging.getLogger("clipjax")

# Config fields that change parameter shapes or presence: a checkpoint is only
# compatible with a config that agrees on all of them.
SHAPE_KEYS = ("model.size", "model.embed_dim", "model.image", "model.text", "model.init_logit_bias", "model.scan",
              "loss.kind", "optim.lock_image", "optim.lock_text", "optim.clip_norm")
# Fields inside SHAPE_KEYS that change no shape (FLIP's mask ratio, the NaFlex length may change between runs).
SHAPE_FREE_KEYS = ("model.image.mask_ratio", "model.image.seq_len")


class IncompatibleCheckpoint(UserError, ValueError):
    """The checkpoint in the workdir was written by a config with other shapes."""


class WorkdirError(UserError, PermissionError):
    """The workdir cannot be created or written."""


class DamagedCheckpoint(UserError, RuntimeError):
    """A checkpoint step whose files cannot be read, although its layout matches this config."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint step {step} is damaged: {reason}")
        self.step, self.reason = step, reason


class CheckpointSaveError(UserError, RuntimeError):
    """An (asynchronous) checkpoint save failed: disk full, permissions, a vanished bucket."""


def _first_line(error: BaseException, limit: int = 1000) -> str:
    """The gist of a storage error: tensorstore appends kilobytes of spec JSON after the cause."""
    text = str(error).split(" [tensorstore_spec", 1)[0].strip().splitlines()
    text = text[0] if text else type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _leaf_shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path: shape} with dict keys, attribute names and sequence indices all written as strings."""
    def part(k) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(part(k) for k in path): tuple(leaf.shape) for path, leaf in flat}


def _all_processes(ok: bool) -> bool:
    """True only when ``ok`` holds on every process (one bad reader makes the step bad for all)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


class PinnedSteps:
    """Orbax preservation policy: keeps the pinned steps (the newest good one before a divergence)."""

    def __init__(self) -> None:
        self.steps: set[int] = set()

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        del context
        return [c.step in self.steps for c in checkpoints]


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
             for k, (a, b) in config_differences(saved_json, current_json, SHAPE_KEYS).items()
             if k not in SHAPE_FREE_KEYS]
    if diffs:
        raise IncompatibleCheckpoint("the checkpoint was written by an incompatible config: " + "; ".join(diffs))


class _QuietOrbaxFailures(logging.Filter):
    """Drops the tracebacks orbax logs (several times over) for a failed background save.

    CheckpointSaveError reports the failure once, naming the path; ``--verbosity=0``
    (absl INFO) keeps orbax's tracebacks for debugging.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and "orbax" in record.pathname and absl_logging.get_verbosity() < absl_logging.INFO:
            record.exc_info, record.exc_text = None, None
        return True


_QUIET_ORBAX = _QuietOrbaxFailures()


class _Manager(ocp.CheckpointManager):
    """Orbax's manager, kept off JAX's preemption sync counter (clipjax.preemption owns it).

    Orbax asks ``reached_preemption(step)`` at save time and again from its finalize
    thread for an older step; each call sets this process's counter to that step, so
    a notice landing just then would pick a sync step some process has already passed.
    Saves are decided by the loop (always ``force=True``), so orbax never needs the answer.
    """

    def reached_preemption(self, step: int) -> bool:
        del step
        return False


class Checkpointer:
    """Saves and restores ``{"state", "data", "config"}`` under ``WORKDIR/checkpoints``."""

    def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True,
                 config_json: str | None = None):
        self.every = int(every)
        self.config_json = config_json
        self.pinned = PinnedSteps()
        preservation = checkpoint_managers.AnyPreservationPolicy(
            [checkpoint_managers.LatestN(n=int(keep)), self.pinned])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation, enable_async_checkpointing=bool(async_save), create=True)
        self.manager = _Manager(checkpoint_dir(workdir), options=options)
        self._saving: int | None = None  # step of the save not yet seen finished, for error messages
        logging.getLogger("absl").addFilter(_QUIET_ORBAX)  # adding the same filter twice is a no-op

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (orbax ignores unfinished ones)."""
        self.manager.reload()
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every complete checkpoint's step, oldest first (``<step>.damaged`` folders are not steps)."""
        self.manager.reload()
        return list(self.manager.all_steps())

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
        if self._saving is not None:
            self.wait()  # orbax would wait for the previous save anyway; its error then names its own step
        self._saving = step
        try:
            return self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001 - a synchronous save fails here, an async one in check()
            raise self._save_error(e) from e

    def pin_newest(self) -> int | None:
        """Keeps the newest saved step whatever ``keep`` says (called when a divergence begins)."""
        step = self.manager.latest_step()
        if step is not None:
            self.pinned.steps.add(int(step))
        return step

    def check(self) -> None:
        """Raises CheckpointSaveError if the last save has failed (cheap: asks orbax only until it finished)."""
        if self._saving is not None and not self.manager.is_saving_in_progress():
            self.wait()  # returns at once, or raises the finished save's error

    def _save_error(self, error: BaseException) -> CheckpointSaveError:
        where = self.manager.directory / str(self._saving) if self._saving is not None else self.manager.directory
        return CheckpointSaveError(f"saving checkpoint step {self._saving} to {where} failed: {_first_line(error)} "
                                   "(free space or fix permissions there; the run resumes from the last complete step)")

    def saved_config(self, step: int) -> str | None:
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        except Exception:  # noqa: BLE001 - a checkpoint without config is accepted
            return None
        return json.dumps(restored["config"])

    def _check_saved_config(self, step: int) -> None:
        if self.config_json is not None and (saved := self.saved_config(step)) is not None:
            check_compatible(saved, self.config_json)

    def restore(self, step: int, abstract_state: Any, data_args: Any = None) -> tuple[Any, Any]:
        """Restores ``state`` (onto ``abstract_state``'s shardings) and the data iterator."""
        self._check_saved_config(step)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_args is not None:
            items["data"] = data_args
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - sorted below into damage or incompatibility
            if not (self.manager.directory / str(step) / "state").exists():
                raise DamagedCheckpoint(step, "its state/ folder is missing") from e
            mismatch = self._layout_mismatch(step, abstract_state)
            if mismatch:
                raise IncompatibleCheckpoint(
                    f"cannot restore step {step} of {self.manager.directory} into this config's state: "
                    f"{mismatch}") from e
            raise DamagedCheckpoint(step, _first_line(e)) from e
        return restored["state"], restored.get("data") if data_args is not None else None

    def _layout_mismatch(self, step: int, abstract_state: Any) -> str | None:
        """How the saved state's tree and shapes differ from ``abstract_state``.

        None when they agree or when the layout itself cannot be read: either way
        the checkpoint is damaged, not written by another model.
        """
        path = self.manager.directory / str(step) / "state"
        try:
            saved = _leaf_shapes(ocp.StandardCheckpointer().metadata(path).item_metadata.tree)
        except Exception:  # noqa: BLE001 - unreadable (or absent) metadata is damage
            return None
        wanted = _leaf_shapes(abstract_state)
        diffs = [f"{'.'.join(k)}: checkpoint {saved.get(k)} vs config {wanted.get(k)}"
                 for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
        return "; ".join(diffs[:5]) + (f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else "") or None

    def restore_newest_intact(self, restore_step: Callable[[int], Any]) -> tuple[int, Any] | None:
        """``(step, restore_step(step))`` for the newest step that restores, or None when there is none.

        Steps are tried newest first. A damaged one is logged, moved aside to
        ``<step>.damaged`` (never deleted; orbax no longer lists it) and the next
        older one is tried. IncompatibleCheckpoint propagates: an older step
        would not fit either.
        """
        for step in sorted(self.all_steps(), reverse=True):
            reason = None
            try:
                result = restore_step(step)
            except DamagedCheckpoint as e:
                reason = e.reason
            if _all_processes(reason is None):
                return step, result
            self._set_aside(step, reason or "another process could not read it")
        return None

    def _set_aside(self, step: int, reason: str) -> None:
        source = self.manager.directory / str(step)
        target = self.manager.directory / f"{step}.damaged"
        n = 1
        while target.exists():
            target, n = self.manager.directory / f"{step}.damaged.{n}", n + 1
        if jax.process_index() == 0:
            source.rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"clipjax_set_aside_{step}")
        self.manager.reload()
        log.warning("checkpoint step %d is damaged (%s); moved to %s, trying the previous step", step, reason, target)

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the params of ``step`` (evaluation, export), onto ``abstract_params``'s shardings."""
        self._check_saved_config(step)
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
            raise DamagedCheckpoint(step, f"{folder}: data iterator files do not form one set: {names}")
        return [found[i][1] for i in sorted(found)]

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - any storage error; re-raised as one clear line
            raise self._save_error(e) from e
        self._saving = None

    def close(self) -> None:
        self.wait()
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


def _saved_pos_shapes(state_dir: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the towers' position tables in a saved state (empty when unreadable)."""
    try:
        tree = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
        return {tower: tuple(tree["params"][tower]["pos_embedding"].shape) for tower in ("image", "text")
                if "pos_embedding" in tree.get("params", {}).get(tower, {})}
    except (AttributeError, KeyError, TypeError, ValueError, FileNotFoundError):
        return {}


def load_params(path: str, abstract_params: Any, *, init_logit_bias: float | None = None) -> Any:
    """Params from another run's checkpoint, restored onto ``abstract_params``'s shardings.

    ``path`` may also be an OpenCLIP/OpenAI weights file (``.safetensors``, ``.bin``, ``.pt``), a
    transformers ``save_pretrained`` directory or a big_vision ``.npz``;
    a logit bias the file lacks starts at ``init_logit_bias``. Position tables a checkpoint
    saved at another image size or context length are resampled to this model's
    (``models.posemb``): fine-tuning at 336 px from a 224 px run.
    """
    if os.path.isfile(path) or os.path.isfile(os.path.join(path, "config.json")):
        from clipjax.interop import openclip

        try:
            return openclip.load_params(path, abstract_params, init_logit_bias=init_logit_bias)
        except openclip.WeightsError as e:
            raise IncompatibleCheckpoint(f"checkpoint.init_from={path!r}: {e}") from e
    from jax.sharding import NamedSharding, PartitionSpec

    from clipjax.models.posemb import resize_params

    state_dir = _state_dir(path)
    target = jax.tree.map(lambda a: a, abstract_params)
    other = {tower: shape for tower, shape in _saved_pos_shapes(state_dir).items()
             if tower in abstract_params and shape != abstract_params[tower]["pos_embedding"].shape}
    for tower, shape in other.items():  # restored whole on every device, then resampled and resharded
        want = abstract_params[tower]["pos_embedding"]
        target[tower]["pos_embedding"] = jax.ShapeDtypeStruct(
            shape, want.dtype, sharding=NamedSharding(want.sharding.mesh, PartitionSpec()))
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                                               dtype=a.dtype), target)
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            state_dir, args=ocp.args.PyTreeRestore(item={"params": target},
                                                   restore_args={"params": restore_args}, partial_restore=True))
    except (ValueError, KeyError, TypeError) as e:
        raise IncompatibleCheckpoint(f"checkpoint.init_from={path!r}: params do not match this model: {e}") from e
    params = restored["params"]
    if other:
        params = resize_params(params, abstract_params)
        for tower in other:
            params[tower]["pos_embedding"] = jax.device_put(params[tower]["pos_embedding"],
                                                            abstract_params[tower]["pos_embedding"].sharding)
        log.info("init_from: position tables of %s resampled to this model's size", ", ".join(sorted(other)))
    return params

