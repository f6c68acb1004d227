"""Mesh axes and the one table that maps logical axes onto them.

Model code annotates parameters and activations with *logical* axis names
("embed", "mlp", "heads", "act_batch", ...) and never names a mesh axis. This
module owns the mesh (its sizes come from ``config.mesh``, whose fields are the
mesh axis names), the logical-to-mesh rule table, and the derived shardings for
parameters and batches.

Mesh axes:
  data    pure data parallelism (parameters replicated).
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3).
  tensor  tensor (model) parallelism inside attention heads and MLPs.
The global batch is split over ``BATCH_AXES = ("data", "fsdp")``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")

# Logical axis -> mesh axis (or tuple of axes, or None for replicated).
# Parameter axes first, then activation axes (prefixed "act_").
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("patch", None),
    ("pos", None),
    ("proj", None),
    ("norm", None),
    ("layers", None),
    # activations
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
)


def rules_from_config(overrides: Sequence[Sequence[Any]] | None = None) -> tuple[tuple[str, Any], ...]:
    """DEFAULT_RULES with per-logical-axis overrides (config ``sharding.rules``)."""
    rules = dict(DEFAULT_RULES)
    for item in overrides or ():
        name, target = item
        if name not in rules:
            raise ValueError(f"sharding.rules: unknown logical axis {name!r}; known: {sorted(rules)}")
        if isinstance(target, list):
            target = tuple(target)
        for axis in (target if isinstance(target, tuple) else (target,)):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"sharding.rules: {name!r} -> unknown mesh axis {axis!r}; known: {MESH_AXES}")
        rules[name] = target
    return tuple(rules.items())


def mesh_axis_sizes(mesh_cfg) -> list[int]:
    """Each mesh axis's size over all slices (ICI x DCN) as the config names it; negative where left open."""
    return [int(mesh_cfg[a]) * int(mesh_cfg[f"dcn_{a}"]) for a in MESH_AXES]


def resolve_mesh(mesh_cfg, num_devices: int) -> tuple[dict[str, int], dict[str, int]]:
    """``(ici, dcn)`` axis sizes of ``config.mesh`` on ``num_devices``, its one -1 filled in.

    ``ici`` sizes are within a slice; ``dcn_*`` sizes (multi-slice pods) multiply into
    the same axes, with slices laid out outermost.
    """
    dcn = {a: int(mesh_cfg[f"dcn_{a}"]) for a in MESH_AXES}
    num_slices = math.prod(dcn.values())
    if num_slices < 1 or num_devices % num_slices:
        raise ValueError(f"mesh: {num_devices} devices do not split into {num_slices} dcn slices")
    per_slice = num_devices // num_slices
    ici = {a: int(mesh_cfg[a]) for a in MESH_AXES}
    unknown = [a for a, s in ici.items() if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {unknown}")
    for a, s in ici.items():
        if s == 0 or s < -1:
            raise ValueError(f"mesh.{a}={s}: sizes must be positive or -1")
    known = math.prod(s for s in ici.values() if s != -1)
    if unknown:
        if per_slice % known:
            raise ValueError(f"mesh: {per_slice} devices not divisible by the fixed axes' product {known} ({ici})")
        ici[unknown[0]] = per_slice // known
    if math.prod(ici.values()) != per_slice:
        raise ValueError(f"mesh: axis sizes {ici} multiply to {math.prod(ici.values())}, not the {per_slice} "
                         "devices of a slice")
    return ici, dcn


def make_mesh(ici: dict[str, int], dcn: dict[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh with Auto axis types from resolved ``ici`` (and ``dcn``) sizes."""
    devices = list(devices if devices is not None else jax.devices())
    dcn = {a: int((dcn or {}).get(a, 1)) for a in MESH_AXES}
    ici_shape, dcn_shape = [int(ici[a]) for a in MESH_AXES], [dcn[a] for a in MESH_AXES]
    if math.prod(ici_shape) * math.prod(dcn_shape) != len(devices):
        raise ValueError(f"mesh: sizes {ici} x dcn {dcn} do not match the {len(devices)} devices")
    if math.prod(dcn_shape) > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
    else:
        try:
            grid = mesh_utils.create_device_mesh(ici_shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.asarray(devices).reshape(ici_shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh ``config.mesh`` describes on ``devices`` (default: all)."""
    devices = list(devices if devices is not None else jax.devices())
    return make_mesh(*resolve_mesh(mesh_cfg, len(devices)), devices=devices)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The axes of BATCH_AXES that ``mesh`` has (a hand-made mesh may lack some)."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_size_divisor(mesh: Mesh) -> int:
    """Number of shards the global batch is split into."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dimension over BATCH_AXES, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops mesh axes that do not divide their dimension (tiny models, odd vocab)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        kept = []
        for name in names:
            size = mesh.shape[name]
            if dim % (size * math.prod(mesh.shape[k] for k in kept)) == 0:
                kept.append(name)
        out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return P(*out)


def param_shardings(abstract_boxed: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a (boxed, abstract) Flax variable tree.

    Axes that do not divide a parameter's dimension are replicated instead, so
    every size in the model table works on every mesh.
    """
    logical = nn.get_partition_spec(abstract_boxed)
    unboxed = nn.unbox(abstract_boxed)
    mesh_specs = jax.tree.map(
        lambda spec: nn.logical_to_mesh_axes(spec, rules),
        logical,
        is_leaf=lambda x: isinstance(x, P),
    )
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, _fit_spec(spec, leaf.shape, mesh)),
        mesh_specs,
        unboxed,
        is_leaf=lambda x: isinstance(x, P),
    )
