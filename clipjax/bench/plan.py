"""`clipjax-bench plan`: the fastest plan that fits a target, chosen by compiling the candidates.

    clipjax-bench plan --target=tpu:v5p:4x4x4 --config=configs/clip.py:model=B/16,batch=32768
    clipjax-bench plan --target=tpu:v5p:4x4x4 --config=configs/clip.py:model=L/14,batch=32768 \\
        --remat=full,dots_no_batch --accum=1,2 --impls=chunked,ring --out=plan.json
    clipjax-train --config=configs/clip.py:model=L/14,batch=32768,data=... --plan=plan.json --workdir=...

Searches meshes (data x fsdp x tensor), remat policies, gradient accumulation and loss
implementations (``clipjax.planner``): a cheap memory estimate prunes the candidates
that cannot fit, the rest are compiled one after another (one compile uses the cores
it can), and a table of every candidate (fits, peak, projected step time, MFU) ends
with the winner as a ready command line. Exits 1 when nothing fits.
"""

from __future__ import annotations

import time

from clipjax.errors import ArgumentParser, UserError


def _parse(argv):
    p = ArgumentParser(prog="clipjax-bench plan", doc=__doc__)
    p.add_argument("--config", required=True, help="config path[:arg]; --config.a.b=VALUE overrides follow")
    p.add_argument("--target", required=True, help="tpu:<topology> (e.g. tpu:v5p:4x4x4) or cpu:N")
    p.add_argument("--remat", default="dots_no_batch,full", help="remat policies to try (comma-separated)")
    p.add_argument("--accum", default="1", help="gradient accumulation steps to try (comma-separated)")
    p.add_argument("--impls", default="chunked,ring", help="loss implementations to try (comma-separated)")
    p.add_argument("--tensor", default="1", help="tensor-parallel sizes to try (comma-separated)")
    p.add_argument("--accelerator", default="TPU v5p", help="cpu targets: whose HBM the fit is checked against")
    p.add_argument("--out", default=None, help="write the winner's overrides here (for clipjax-train --plan)")
    p.add_argument("--json", action="store_true")
    args, rest = p.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = rest
    try:
        args.accums = [int(v) for v in args.accum.split(",")]
        args.tensors = [int(v) for v in args.tensor.split(",")]
    except ValueError:
        raise UserError(f"--accum={args.accum!r} / --tensor={args.tensor!r}: expected comma-separated integers") \
            from None
    return args


def main(argv: list[str]) -> int:
    args = _parse(argv)
    from clipjax import compile_ahead, planner
    from clipjax.config import load_config

    target = compile_ahead.parse_target(args.target)
    devices = compile_ahead.target_devices(target)
    config = load_config(args.config, args.overrides)
    grid = planner.candidates(len(devices), remats=args.remat.split(","), accums=args.accums,
                              impls=args.impls.split(","), tensors=args.tensors)
    capacity = compile_ahead.hbm_bytes(devices, fallback_kind=args.accelerator)
    t0 = time.perf_counter()
    rows, best = planner.search(config, devices, grid, capacity=capacity)
    took = time.perf_counter() - t0

    from clipjax.bench.table import emit

    emit([{k: v for k, v in r.items() if k != "candidate"} for r in rows], as_json=args.json)
    print(f"searched {len(rows)} candidates ({sum(r['status'] == 'compiled' for r in rows)} compiled) "
          f"in {took:.0f} s on this machine")
    if best is None:
        print("no candidate fits: try --remat=full, larger --accum, or a bigger target")
        return 1
    cmd = " ".join(["clipjax-train", f"--config={args.config}", *args.overrides, *best["candidate"].overrides()])
    print(f"fastest that fits: step {best['step_s'] or float('nan'):.4g} s, mfu {best['mfu'] or float('nan'):.3g}, "
          f"peak {best['peak_GiB']:.1f} GiB\n  {cmd} --workdir=...")
    if args.out:
        planner.write_plan(args.out, best, target=str(target), config_spec=args.config)
        print(f"  or: clipjax-train --config={args.config} --plan={args.out} --workdir=...")
    return 0
