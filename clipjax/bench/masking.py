"""`clipjax-bench masking`: train step time with FLIP patch masking against none, in one run.

Builds the real step (config -> ``make_setup`` -> ``init_state`` ->
``compile_train_step(setup, phase)``) once per mask ratio on one device, feeds
each the same device-resident batch (data excluded), and alternates timed
rounds between the ratios so that load changes hit them alike. Reports the
median step time and the speedup over ratio 0 (median of per-round ratios).

    clipjax-bench masking --config=configs/clip.py:model=B/16 --batch=8 --set=model.dtype=float32
"""

from __future__ import annotations

import statistics
import time

from clipjax.errors import ArgumentParser


def _parse(argv):
    p = ArgumentParser(prog="clipjax-bench masking", doc=__doc__)
    p.add_argument("--config", default="configs/clip.py:model=B/16", help="config path[:arg], as for clipjax-train")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override without the --config. prefix (repeatable), e.g. model.dtype=float32")
    p.add_argument("--batch", type=int, default=8, help="global batch")
    p.add_argument("--ratios", default="0,0.5,0.75", help="mask ratios (comma-separated; the first is the baseline)")
    p.add_argument("--steps", type=int, default=2, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per ratio, interleaved")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per ratio after compiling")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    import jax
    import numpy as np
    from flax import linen as nn

    from clipjax import sharding
    from clipjax.bench.table import emit
    from clipjax.config import load_config, validate
    from clipjax.stages import Phase, final_phase
    from clipjax.train_step import batch_spec, compile_train_step, init_state, make_setup

    config = load_config(args.config, [f"--config.{s}" for s in args.set])
    with config.unlocked():
        config.train.batch_size = args.batch
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
        config.data.source = "synthetic"  # no data is read (one resident batch); nothing to configure
    devices = jax.devices()[:1]
    validate(config, len(devices))
    setup = make_setup(config, sharding.mesh_from_config(config.mesh, devices))
    state = init_state(setup, config.seed)
    full = final_phase(config)
    ratios = [float(r) for r in args.ratios.split(",")]
    steps = {}
    for r in ratios:
        t0 = time.perf_counter()
        steps[r] = (compile_train_step(setup, Phase(full.image_size, full.context_length, r)), time.perf_counter() - t0)
    rng = np.random.default_rng(0)
    shardings = setup.batch_shardings()
    host = {"image": rng.integers(0, 256, (args.batch, *batch_spec(config)["image"][0]), dtype=np.uint8),
            "image_box": np.tile(np.asarray([0, 0, full.image_size, full.image_size], np.float32), (args.batch, 1)),
            "image_hw": np.full((args.batch, 2), full.image_size, np.int32),
            "text": rng.integers(1, 1000, (args.batch, full.context_length)).astype(np.int32)}
    batch = {k: jax.device_put(v, shardings[k]) for k, v in host.items()}

    def run(r: float, n: int) -> float:
        nonlocal state
        t0 = time.perf_counter()
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
            for _ in range(n):
                state, metrics = steps[r][0](state, batch)
            jax.block_until_ready((state, metrics))
        return (time.perf_counter() - t0) / max(n, 1)

    for r in ratios:
        run(r, args.warmup)
    times: dict[float, list[float]] = {r: [] for r in ratios}
    for i in range(args.rounds):
        order = ratios[i % len(ratios):] + ratios[:i % len(ratios)]  # rotate who goes first
        for r in order:
            times[r].append(run(r, args.steps))
    base = ratios[0]
    rows = []
    for r in ratios:
        step_s = statistics.median(times[r])
        rows.append({"model": config.model.size, "batch": args.batch, "dtype": config.model.dtype,
                     "remat": config.model.remat, "mask_ratio": r, "step_s": step_s,
                     "samples/s": args.batch / step_s,
                     "speedup": statistics.median(b / t for b, t in zip(times[base], times[r])),
                     "compile_s": steps[r][1]})
    emit(rows, as_json=args.json)
    return 0
