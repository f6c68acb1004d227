"""The SPMD partitioner never has to replicate a tensor to reshard it ("involuntary full rematerialization")."""

import pytest

from clipjax import sharding
from clipjax.config import load_config, validate
from clipjax.models import towers
from clipjax.train_step import compile_train_step, make_setup

WARNING = "Involuntary full rematerialization"


def _compile_demo(devices) -> None:
    c = validate(load_config("configs/demo.py:smoke"), 8)  # mesh data=4 x fsdp=2
    compile_train_step(make_setup(c, sharding.mesh_from_config(c.mesh, devices)))


@pytest.mark.slow
def test_fsdp_step_compiles_without_full_rematerialization(devices, capfd, monkeypatch, fresh_compiles):
    capfd.readouterr()
    _compile_demo(devices)
    assert WARNING not in capfd.readouterr().err

    # Positive control: without the text tower's whole-table lookup (token table left
    # sharded over fsdp) the partitioner warns, and capfd sees it.
    original = towers.constrain
    monkeypatch.setattr(towers, "constrain", lambda x, axes: x if axes == ("vocab", None) else original(x, axes))
    _compile_demo(devices)
    assert WARNING in capfd.readouterr().err
