"""`clipjax-bench compile`: a memory and time plan for a config, before renting the hardware.

Compiles the real train step for N simulated CPU devices (nothing is run or
allocated) and reports per-device memory from the compiled executable
(arguments, temporaries, outputs), model FLOPs per step from its cost analysis,
and the projected step time at a stated accelerator peak and MFU.

    clipjax-bench compile --config=configs/clip.py:model=H/14,batch=32768 --devices=256 \\
        --mesh=data=16,fsdp=16 --accelerator="TPU v5p" --mfu=0.4

CPU-compiled memory is an estimate of the accelerator's: XLA's buffer assignment
on CPU differs in detail (fusion, layouts), but parameters, optimizer state and
the large activations are the same sizes.
"""

from __future__ import annotations


from clipjax.bench import simulated_cpu_devices
from clipjax.errors import ArgumentParser


def _parse(argv):
    p = ArgumentParser(prog="clipjax-bench compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config path[:arg], as for clipjax-train")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override without the --config. prefix (repeatable), e.g. loss.impl=ring")
    p.add_argument("--devices", type=int, default=8, help="number of simulated devices")
    p.add_argument("--mesh", action="append", default=[],
                   help="mesh split(s) like data=16,fsdp=16 (repeatable: one row each); default: the config's")
    p.add_argument("--accelerator", default="TPU v5p", help="device kind looked up in clipjax.mfu.PEAK_FLOPS")
    p.add_argument("--peak", type=float, default=None, help="peak FLOP/s per device (overrides --accelerator)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOPs utilisation for the projection")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def plan(config, devices, mesh_sizes: dict[str, int] | None, peak: float, mfu: float) -> dict:
    """Compiles ``config``'s train step on ``devices`` and returns one row of the plan."""
    import time

    from clipjax import config as config_lib
    from clipjax import sharding
    from clipjax import hlo_flops
    from clipjax.train_step import compile_train_step, make_setup

    if mesh_sizes:
        with config.unlocked():
            for axis in sharding.MESH_AXES:
                config.mesh[axis] = int(mesh_sizes.get(axis, 1))
    config_lib.validate(config, len(devices))
    mesh = sharding.mesh_from_config(config.mesh, devices)
    t0 = time.perf_counter()
    setup = make_setup(config, mesh)
    compiled = compile_train_step(setup)
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    flops = hlo_flops.compiled_flops(compiled) or 0.0
    gib = 1024**3
    args_b = getattr(mem, "argument_size_in_bytes", 0)
    temp_b = getattr(mem, "temp_size_in_bytes", 0)
    out_b = getattr(mem, "output_size_in_bytes", 0)
    alias_b = getattr(mem, "alias_size_in_bytes", 0)
    step_s = flops / (peak * mfu) if flops else float("nan")
    return {
        "model": config.model.size,
        "batch": config.train.batch_size,
        "devices": len(devices),
        "mesh": "x".join(f"{a}{mesh.shape[a]}" for a in sharding.MESH_AXES),
        "loss": f"{config.loss.kind}/{config.loss.impl}",
        "remat": config.model.remat,
        "args_GiB": args_b / gib,
        "temp_GiB": temp_b / gib,
        "out_GiB": out_b / gib,
        # Donated state aliases its outputs: peak is arguments + temporaries + non-aliased outputs.
        "peak_GiB": (args_b + temp_b + max(out_b - alias_b, 0)) / gib,
        "TFLOP/step/dev": flops / 1e12,
        "step_s": step_s,
        "samples/s": config.train.batch_size / step_s if flops else float("nan"),
        "compile_s": compile_s,
    }


def main(argv: list[str]) -> int:
    args = _parse(argv)
    devices = simulated_cpu_devices(args.devices)

    from clipjax import mfu as mfu_lib
    from clipjax.bench.table import emit
    from clipjax.config import load_config

    peak = args.peak if args.peak is not None else mfu_lib.peak_for_kind(args.accelerator)
    rows = []
    for mesh_spec in args.mesh or [None]:
        sizes = None
        if mesh_spec:
            sizes = {k: int(v) for k, v in (item.split("=") for item in mesh_spec.split(","))}
        config = load_config(args.config, [f"--config.{s}" for s in args.set])
        row = plan(config, devices, sizes, peak, args.mfu)
        row["assumed"] = f"{args.accelerator if args.peak is None else 'peak'} {peak / 1e12:.0f}TF @ mfu {args.mfu}"
        rows.append(row)
        if not args.json:
            print(f"compiled {row['mesh']} in {row['compile_s']:.0f}s", flush=True)
    emit(rows, as_json=args.json)
    return 0
