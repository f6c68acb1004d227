"""What ``clipjax-train`` and ``clipjax-eval`` share: config -> mesh -> setup -> checkpoint."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import jax

from clipjax import checkpoint as ckpt_lib
from clipjax import config as config_lib
from clipjax import sharding
from clipjax.train_step import Setup, TrainState, make_setup

log = logging.getLogger("clipjax")


def prepare(config, workdir: str, devices: Sequence[jax.Device] | None = None, *,
            async_save: bool = True) -> tuple[Setup, ckpt_lib.Checkpointer]:
    """Validates ``config`` for ``devices`` (default: all), builds the mesh and the run's
    setup, and opens the checkpoints of ``workdir`` (which must be writable)."""
    devices = list(devices) if devices is not None else jax.devices()
    config_lib.validate(config, len(devices))
    ckpt_lib.check_workdir_writable(workdir)
    setup = make_setup(config, sharding.mesh_from_config(config.mesh, devices))
    checkpointer = ckpt_lib.Checkpointer(
        workdir, every=config.checkpoint.every, keep=config.checkpoint.keep,
        async_save=async_save and config.checkpoint.async_save, config_json=config.to_json())
    return setup, checkpointer


def restore(checkpointer: ckpt_lib.Checkpointer, setup: Setup, step: int, data_iter: Any = None) -> TrainState:
    """The state saved at ``step``, on ``setup``'s shardings; ``data_iter`` (when given) continues
    the data stream saved with it, also when another number of processes saved it."""
    if data_iter is None:
        return checkpointer.restore(step, setup.abstract_state)[0]
    data_states = checkpointer.data_states(step)
    if not data_states or len(data_states) == jax.process_count():
        return checkpointer.restore(step, setup.abstract_state, data_iter.restore_args())[0]
    state, _ = checkpointer.restore(step, setup.abstract_state)
    data_iter.set_state_from_processes(data_states)
    log.info("data stream of %d processes continued by %d", len(data_states), jax.process_count())
    return state
