"""The fastest plan that fits: a search over mesh, remat, accumulation and loss implementation.

Each candidate is the config with ``mesh.{data,fsdp,tensor}``, ``model.remat``,
``train.grad_accum`` and ``loss.impl`` overridden. A cheap memory estimate (parameters,
gradients and AdamW state per device, plus the activations each remat policy keeps) drops
the candidates that cannot fit by a wide margin; the rest are compiled for the target
(``compile_ahead.plan``: the TPU compiler's memory and step-time estimate). The winner is
the fitting candidate with the shortest projected step (CPU targets: the least peak
memory, their step time being an assumption). A plan file holds its overrides for
``clipjax-train --plan=FILE``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from typing import Any, Sequence

from clipjax.errors import ConfigError, UserError

# Memory estimate: bytes kept per token, layer and unit of width for the backward pass,
# by remat policy (bf16 activations): full keeps each block's input; the dot policies
# keep the projections' outputs (q, k, v, attention output, MLP in and out ~ 4 + 2 x mlp
# ratio 4 widths); none keeps every intermediate too, attention scores aside.
ACT_BYTES_PER_WIDTH = {"full": 2 * 1, "dots": 2 * 12, "dots_no_batch": 2 * 12, "none": 2 * 20}
STATE_BYTES_PER_PARAM = 4 + 4 + 8  # fp32 parameters, gradients, AdamW's two moments
PRUNE_FACTOR = 2.0  # estimate over HBM by more than this: not compiled (the estimate is rough)


@dataclasses.dataclass(frozen=True)
class Candidate:
    data: int
    fsdp: int
    tensor: int
    remat: str
    grad_accum: int
    impl: str

    def overrides(self) -> list[str]:
        return [f"--config.mesh.data={self.data}", f"--config.mesh.fsdp={self.fsdp}",
                f"--config.mesh.tensor={self.tensor}", f"--config.model.remat={self.remat}",
                f"--config.train.grad_accum={self.grad_accum}", f"--config.loss.impl={self.impl}"]


def meshes(num_devices: int, tensors: Sequence[int] = (1, 2, 4)) -> list[tuple[int, int, int]]:
    """Every ``(data, fsdp, tensor)`` with product ``num_devices``, data and fsdp powers of two."""
    out = []
    for tensor in tensors:
        if num_devices % tensor:
            continue
        rest = num_devices // tensor
        data = 1
        while data <= rest:
            if rest % data == 0:
                out.append((data, rest // data, tensor))
            data *= 2
    return out


def candidates(num_devices: int, *, remats: Sequence[str], accums: Sequence[int], impls: Sequence[str],
               tensors: Sequence[int] = (1, 2, 4)) -> list[Candidate]:
    """The search grid: meshes x remat policies x accumulation steps x loss implementations."""
    return [Candidate(d, f, t, r, k, i) for (d, f, t), r, k, i
            in itertools.product(meshes(num_devices, tensors), remats, accums, impls)]


def apply(config, c: Candidate):
    """A copy of ``config`` with the candidate's overrides."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = c.data, c.fsdp, c.tensor
        config.model.remat, config.train.grad_accum, config.loss.impl = c.remat, c.grad_accum, c.impl
    return config


def memory_estimate(config, num_devices: int, num_params: int) -> float:
    """Rough per-device bytes: sharded training state plus the activations the remat policy keeps."""
    m, c = config.model, config.mesh
    state = num_params * STATE_BYTES_PER_PARAM / max(c.fsdp * c.tensor, 1)
    micro = config.train.batch_size / max(c.data * c.fsdp, 1) / max(config.train.grad_accum, 1)
    per_width = ACT_BYTES_PER_WIDTH.get(m.remat, ACT_BYTES_PER_WIDTH["none"])
    tokens_img = (m.image.image_size // m.image.patch_size) ** 2 + 1
    acts = micro * per_width / max(c.tensor, 1) * (tokens_img * m.image.depth * m.image.width
                                                    + m.text.context_length * m.text.depth * m.text.width)
    return state + acts


def _num_params(config) -> int:
    """Parameters of the config's model (validated), counted on shapes alone."""
    import jax

    from clipjax.models import build_model, dummy_inputs

    model = build_model(config.model)
    images, ids = dummy_inputs(config.model)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, ids))["params"]
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))


def search(config, devices: Sequence[Any], grid: Sequence[Candidate], *,
           capacity: tuple[float | None, str] | None = None, peak_flops: float | None = None,
           assumed_mfu: float | None = None) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Compiles every candidate of ``grid`` that the estimate does not rule out; ``(rows, best row)``.

    One row per candidate, in grid order: ``status`` is "compiled", "pruned" (estimate over
    ``PRUNE_FACTOR`` x HBM) or "invalid" (the config's own check refused it, e.g. a batch
    that does not divide). The best row is None when nothing fits.
    """
    from clipjax import compile_ahead

    hbm = (capacity or compile_ahead.hbm_bytes(devices))[0]
    num_params = None
    rows = []
    for c in grid:
        cfg = apply(config, c)
        base = {"data": c.data, "fsdp": c.fsdp, "tensor": c.tensor, "remat": c.remat, "k": c.grad_accum,
                "loss": c.impl}
        try:
            compile_ahead.validate_for(cfg, len(devices))
        except ConfigError as e:
            rows.append({**base, "status": "invalid", "fits": False, "note": str(e)})
            continue
        num_params = num_params or _num_params(cfg)  # the same model in every candidate
        estimate = memory_estimate(cfg, len(devices), num_params)
        base["estimate_GiB"] = estimate / compile_ahead.GIB
        if hbm and estimate > PRUNE_FACTOR * hbm:
            rows.append({**base, "status": "pruned", "fits": False})
            continue
        t0 = time.perf_counter()
        row = compile_ahead.plan(cfg, devices, capacity=capacity, peak_flops=peak_flops, assumed_mfu=assumed_mfu)
        rows.append({**base, "status": "compiled", "fits": row["fits"], "peak_GiB": row["peak_GiB"],
                     "hbm_GiB": row["hbm_GiB"], "step_s": row["step_s"], "mfu": row["mfu"],
                     "compile_s": time.perf_counter() - t0, "candidate": c})
    fitting = [r for r in rows if r["fits"]]
    timed = [r for r in fitting if r.get("step_s")]
    best = (min(timed, key=lambda r: r["step_s"]) if timed
            else min(fitting, key=lambda r: r["peak_GiB"]) if fitting else None)
    return rows, best


def write_plan(path: str, best: dict[str, Any], *, target: str, config_spec: str) -> None:
    """Saves the winner's overrides (and what it was chosen on) for ``clipjax-train --plan=FILE``."""
    c: Candidate = best["candidate"]
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"target": target, "config": config_spec, "overrides": c.overrides(),
                   "step_s": best["step_s"], "mfu": best["mfu"], "peak_GiB": best["peak_GiB"]}, f, indent=1)


def read_overrides(path: str) -> list[str]:
    """The ``--config.a.b=VALUE`` overrides of a plan file written by ``write_plan``."""
    try:
        with open(path, encoding="utf-8") as f:
            overrides = json.load(f)["overrides"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--plan={path}: not a plan file of clipjax-bench plan ({type(e).__name__}: {e}); "
                        f"write one with clipjax-bench plan --target=... --config=... --out={path}") from None
    if not all(isinstance(o, str) and o.startswith("--config.") for o in overrides):
        raise UserError(f"--plan={path}: its overrides must be --config.a.b=VALUE strings")
    return overrides
