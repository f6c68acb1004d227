"""`clipjax-bench compile`: a memory and time plan for a config, before renting the hardware.

Compiles the real train step for a target's devices (nothing runs, nothing is
allocated) and prints per-device arguments, temporaries and peak memory against
the device's HBM, whether it fits, model FLOPs, the compiler's FLOPs and the
projected step time and MFU (``clipjax.compile_ahead``).

    clipjax-bench compile --target=tpu:v5p:4x4x4 --config=configs/clip.py:model=B/16,batch=32768
    clipjax-bench compile --target=tpu:v5e:16x16 --config=configs/clip.py:model=H/14,batch=32768 \\
        --config.model.remat=full --mesh=data=16,fsdp=16 --mesh=fsdp=256
    clipjax-bench compile --target=cpu:64 --config=... --accelerator="TPU v5p" --mfu=0.4

``--breakdown`` (TPU targets) adds, per row, where the projected step goes: its seconds
split into categories from the TPU compiler's per-operation cycle estimates (matmuls of
each tower, attention, normalisation and element-wise work, loss, optimizer update,
copies, remat recomputation; ``clipjax.step_breakdown``), summing to the step time, and
the collectives' bytes by kind (the estimate counts no time for them).

``tpu:<topology>`` uses the TPU compiler (libtpu, from any machine); ``cpu:N``
compiles for N simulated CPU devices, whose memory overstates an accelerator's
and whose step time is an assumption (``--accelerator`` peak at ``--mfu``).
Exits 1 when a row does not fit.
"""

from __future__ import annotations

import sys

from clipjax.errors import ArgumentParser, UserError


def _parse(argv):
    p = ArgumentParser(prog="clipjax-bench compile", doc=__doc__)
    p.add_argument("--config", required=True, help="config path[:arg], as for clipjax-train; "
                   "--config.a.b=VALUE overrides follow as for clipjax-train")
    p.add_argument("--target", default=None,
                   help="tpu:<topology> (tpu:v5p:8x8x8, tpu:v5e:16x16, any name libtpu accepts) or cpu:N; "
                        "default cpu:--devices")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override without the --config. prefix (repeatable), e.g. loss.impl=ring")
    p.add_argument("--devices", type=int, default=8, help="number of simulated devices (same as --target=cpu:N)")
    p.add_argument("--mesh", action="append", default=[],
                   help="mesh split(s) like data=16,fsdp=16 (repeatable: one row each); default: the config's")
    p.add_argument("--accelerator", default="TPU v5p",
                   help="cpu targets: device kind whose peak FLOP/s (clipjax.mfu.PEAK_FLOPS) and HBM "
                        "(clipjax.compile_ahead.HBM_GIB) the projection uses")
    p.add_argument("--peak", type=float, default=None, help="peak FLOP/s per device (overrides the table)")
    p.add_argument("--mfu", type=float, default=0.4, help="cpu targets: assumed model-FLOPs utilisation")
    p.add_argument("--breakdown", action="store_true",
                   help="tpu targets: split the projected step time by category (clipjax.step_breakdown)")
    p.add_argument("--json", action="store_true")
    args, rest = p.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = rest + [f"--config.{s}" for s in args.set]
    return args


def _mesh_sizes(spec: str) -> dict[str, int]:
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for item in spec.split(","):
        axis, _, value = item.partition("=")
        if axis not in sizes or not value.lstrip("-").isdigit():
            raise UserError(f"--mesh={spec!r}: expected axis=size pairs over data, fsdp, tensor (e.g. data=16,fsdp=16)")
        sizes[axis] = int(value)
    return sizes


def run(target_spec: str, config_spec: str, overrides: list[str], meshes: list[str], *, accelerator: str | None,
        peak: float | None, assumed_mfu: float | None, breakdown: bool = False) -> list[dict]:
    """One plan row per mesh (the config's own when ``meshes`` is empty); UserError for a bad target or config."""
    from clipjax import compile_ahead

    target = compile_ahead.parse_target(target_spec)
    devices = compile_ahead.target_devices(target)

    from clipjax import mfu as mfu_lib
    from clipjax.config import load_config

    capacity = None
    if target.platform == "cpu":
        try:
            peak = peak if peak is not None else mfu_lib.peak_for_kind(accelerator)
        except ValueError as e:
            raise UserError(f"--accelerator: {e}") from None
        capacity = compile_ahead.hbm_bytes(devices, fallback_kind=accelerator)
    rows = []
    for mesh_spec in meshes or [None]:
        config = load_config(config_spec, overrides)
        if mesh_spec:
            with config.unlocked():
                config.mesh.update(_mesh_sizes(mesh_spec))
        # Lowering and compiling a large step takes minutes: say which one is under way.
        print(f"compiling the train step for {target}, mesh {mesh_spec or 'of the config'} ...", file=sys.stderr,
              flush=True)
        row = compile_ahead.plan(config, devices, peak_flops=peak, assumed_mfu=assumed_mfu, capacity=capacity,
                                 breakdown=breakdown)
        row = {"target": str(target), **row}
        if target.platform == "cpu":
            row["assumed"] = f"{accelerator} {peak / 1e12:.0f}TF @ mfu {assumed_mfu}"
        rows.append(row)
    return rows


def main(argv: list[str]) -> int:
    args = _parse(argv)
    if args.target is None:
        args.target = f"cpu:{args.devices}"
    rows = run(args.target, args.config, args.overrides, args.mesh, accelerator=args.accelerator,
               peak=args.peak, assumed_mfu=args.mfu, breakdown=args.breakdown)

    from clipjax.bench.table import emit

    parts = [None if args.json else r.pop("breakdown", None) for r in rows]  # JSON keeps it in the row
    emit(rows, as_json=args.json)
    if args.breakdown and not args.json:
        for row, part in zip(rows, parts):
            print(f"\nwhere the projected step goes: {row['model']} {row['mesh']} (step {row['step_s'] or 0:.4g} s)")
            if not part:
                print("  no per-operation estimates (not a TPU target, or no step-time estimate)")
                continue
            emit([{"category": c, "seconds": s, "share": s / row["step_s"]} for c, s in part["seconds"].items()]
                 + [{"category": f"collective {k} (GiB, not timed)", "seconds": v, "share": ""}
                    for k, v in part["collective_GiB"].items()])
    for row in rows:
        if not row["fits"]:
            print(f"does not fit: {row['mesh']} needs {row['peak_GiB']:.1f} GiB per device, "
                  f"{row['device']} has {row['hbm_GiB']:.1f} GiB", file=sys.stderr)
    return 0 if all(r["fits"] for r in rows) else 1
