"""`clipjax-bench train`: the real compiled train step, timed (and side by side with OpenCLIP).

For each model size x batch x dtype x remat policy it builds the step the way
`clipjax-train` does (config -> ``make_setup`` -> ``init_state`` ->
``compile_train_step``) and times it in two rows:

* ``data=excluded``: one device-resident batch (uint8 crops, boxes, token ids) fed
  to every step: the step alone;
* ``data=included``: batches from the real input pipeline over the synthetic
  dataset (decode, crop, tokenize, host-to-device), as in training.

Each row reports steady-state step time and samples/s (median of ``--rounds``
rounds of ``--steps`` steps, after ``--warmup`` steps), model-FLOP utilisation
(``mfu``: the analytic count of ``clipjax.mfu.clip_train_flops``), hardware-FLOP
utilisation (``hfu``: XLA's cost analysis of the compiled step, recomputation
included), compile time, peak memory (compiled estimate; the allocator's peak
where the backend reports one), and the process's page faults and kernel seconds a
step (``getrusage``: what the host's allocator costs, ``clipjax/host_env.py``).

``--vs=openclip`` builds the same model (widths, depths, heads, patch, context,
vocabulary, embedding), batch, fp32, AdamW (lr, betas, eps, decay mask) and
clip-norm in open-clip-torch in a second process (``openclip_step.py``), pins
both processes to the same cores, alternates rounds between them and reports
``vs_openclip``: clipjax samples/s over OpenCLIP's, the median of the per-round
ratios. ``--vs=decoder`` times, in the same process and alternating rounds, the same
step with SigLIP 2's LocCa decoder on (``model.decoder.enabled``, full-length targets)
and reports ``decoder_step_ratio``: its step time over the step without, the median of
the per-round ratios.

    clipjax-bench train --model=B/32 --batch=32 --vs=openclip
    clipjax-bench train --config=configs/demo.py --batch=128 --vs=openclip
    clipjax-bench train --model=B/16 --batch=256 --dtype=bfloat16 --remat=none,dots_no_batch
    clipjax-bench train --model=B/16 --batch=16 --vs=decoder --data=excluded
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from clipjax import host_env
from clipjax.errors import ArgumentParser


def _csv(s: str) -> list[str]:
    return [v for v in s.split(",") if v]


def _parse(argv):
    p = ArgumentParser(prog="clipjax-bench train", doc=__doc__)
    p.add_argument("--config", default="configs/clip.py", help="config path[:arg], as for clipjax-train")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override without the --config. prefix (repeatable), e.g. loss.impl=ring")
    p.add_argument("--model", type=_csv, default=[None], help="model sizes (comma-separated); default: the config's")
    p.add_argument("--batch", type=lambda s: [int(v) for v in _csv(s)], default=[32], help="global batch sizes")
    p.add_argument("--dtype", type=_csv, default=[None], help="model.dtype values; default: the config's")
    p.add_argument("--remat", type=_csv, default=[None], help="model.remat policies; default: the config's")
    p.add_argument("--devices", type=int, default=0,
                   help="devices in the mesh (CPU: simulated devices); 0: all accelerators, or on CPU the "
                        "devices the config's mesh names (1 if it has a -1 axis)")
    p.add_argument("--data", type=_csv, default=["excluded", "included"], help="rows: excluded, included")
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (interleaved with OpenCLIP's under --vs)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--vs", default="", choices=["", "openclip", "decoder"],
                   help="also time the same step in OpenCLIP, or with the LocCa decoder on")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU cores both processes are pinned to (0: all this process may use)")
    p.add_argument("--data_dir", default="", help="synthetic dataset folder (default: a temporary folder)")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def case_config(args, model: str | None, batch: int, dtype: str | None, remat: str | None, data_dir: str,
                num_devices: int):
    """The validated config of one benchmark case (synthetic data, a mesh over ``num_devices``)."""
    from clipjax import config as config_lib

    overrides = [f"--config.{s}" for s in args.set]
    config = config_lib.load_config(args.config, overrides)
    with config.unlocked():
        if model:
            config.model.size = model
        if dtype:
            config.model.dtype = dtype
        if remat:
            config.model.remat = remat
        config.train.batch_size = batch
        config.train.steps = 1_000_000  # the lr schedule only; nothing is trained to the end
        if not any(s.startswith("mesh.") for s in args.set):  # data parallel over the benchmarked devices
            config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
        config.data.source = "synthetic"
        config.data.path = data_dir
        config.data.synth.num_train = max(512, 2 * batch)
        config.data.synth.num_heldout = 32
    return config_lib.validate(config, num_devices)


def device_batch(setup, seed: int = 0) -> dict:
    """A random batch in the step's input layout, placed on the devices with the step's shardings."""
    import jax
    import numpy as np

    from clipjax.train_step import batch_spec

    config = setup.config
    rng = np.random.default_rng(seed)
    b = config.train.batch_size
    out = {}
    for key, (shape, dtype) in batch_spec(config).items():
        if key == "image":
            out[key] = rng.integers(0, 256, (b, *shape), dtype=np.uint8)
        elif key == "image_box":  # the whole buffer: the full resampling work of a real crop
            p = batch_spec(config)["image"][0][0]
            out[key] = np.tile(np.asarray([0, 0, p, p], np.float32), (b, 1))
        elif key == "image_hw":
            p = batch_spec(config)["image"][0][0]
            out[key] = np.full((b, 2), p, np.int32)
        elif key == "text":
            t = config.model.text
            ids = rng.integers(1, t.vocab_size - 1, (b, *shape), dtype=np.int32)
            ids[:, -1] = t.eot_id
            out[key] = ids
        elif key == "dec_ids":  # a caption filling the decoder's whole length: its full cost
            ids = rng.integers(1, config.model.text.vocab_size - 1, (b, *shape), dtype=np.int32)
            ids[:, 0] = setup.decoder_loss.first_task_id
            out[key] = ids
        elif key == "dec_target":
            out[key] = np.arange(shape[0])[None].repeat(b, 0) > 0
    shardings = setup.batch_shardings()
    return {k: jax.device_put(v, shardings[k]) for k, v in out.items()}


def _peak_memory(compiled, devices) -> dict[str, float]:
    gib = 1024**3
    out = {}
    mem = compiled.memory_analysis()
    if mem is not None:
        args_b, temp_b = mem.argument_size_in_bytes, mem.temp_size_in_bytes
        out_b, alias_b = mem.output_size_in_bytes, mem.alias_size_in_bytes
        # Donated state aliases its outputs: peak is arguments + temporaries + non-aliased outputs.
        out["peak_GiB"] = (args_b + temp_b + max(out_b - alias_b, 0)) / gib
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        out["allocator_peak_GiB"] = stats["peak_bytes_in_use"] / gib
    return out


class OpenClipWorker:
    """The OpenCLIP step in a child process; ``run(n)`` returns the seconds n steps took."""

    def __init__(self, spec: dict[str, Any], cores: set[int] | None):
        # OpenCLIP runs in the environment the user gave, without the settings clipjax's tools add.
        env = dict(host_env.without_added(dict(os.environ)), OMP_NUM_THREADS=str(spec["threads"]))
        # No preexec_fn: it runs between fork and exec, and forking JAX's threads warns of deadlocks.
        spec = dict(spec, cores=sorted(cores) if cores else None)
        self.proc = subprocess.Popen([sys.executable, "-m", "clipjax.bench.openclip_step", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "ready":
            self.close()
            raise RuntimeError("the OpenCLIP worker did not start (is open-clip-torch importable?)")

    def run(self, steps: int) -> float:
        self.proc.stdin.write(f"run {steps}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass
            self.proc.wait(timeout=60)


def openclip_spec(config, threads: int, warmup: int) -> dict[str, Any]:
    """What the OpenCLIP worker needs to build the same model, batch and optimizer."""
    m, o = config.model, config.optim
    if m.image.pool not in ("tok", "gap"):
        raise SystemExit(f"--vs=openclip: model.image.pool={m.image.pool!r} has no OpenCLIP equivalent here; "
                         "use tok or gap")
    if m.dtype not in ("float32", "bfloat16"):
        raise SystemExit("--vs=openclip compares fp32 steps (bf16 on a CUDA GPU): pass --dtype=float32")
    keys = ("width", "depth", "heads", "mlp_dim")
    return {
        "embed_dim": m.embed_dim, "act": m.act, "batch": config.train.batch_size, "threads": threads,
        "amp_bf16": m.dtype == "bfloat16",
        "warmup": warmup, "max_logit_scale": m.max_logit_scale,
        "image": {**{k: m.image[k] for k in keys}, "patch_size": m.image.patch_size,
                  "image_size": m.image.image_size, "pool": m.image.pool, "ln_pre": m.image.ln_pre},
        "text": {**{k: m.text[k] for k in keys}, "context_length": m.text.context_length,
                 "vocab_size": m.text.vocab_size, "causal": m.text.causal, "pool": m.text.pool},
        "optim": {"lr": o.lr, "b1": o.b1, "b2": o.b2, "eps": o.eps, "weight_decay": o.weight_decay,
                  "clip_norm": o.clip_norm},
    }


def _timed_rounds(run_round, rounds: int, other=None) -> tuple[list[float], list[float]]:
    """Seconds per round of ``run_round`` and, interleaved with it, of ``other``."""
    mine, theirs = [], []
    for _ in range(rounds):
        mine.append(run_round())
        if other is not None:
            theirs.append(other())
    return mine, theirs


def bench_case(config, devices, args, cores) -> list[dict[str, Any]]:
    """Rows (data excluded / included) of one configuration."""
    import jax

    from clipjax import hlo_flops
    from clipjax import mfu as mfu_lib
    from clipjax import sharding
    from clipjax.train_step import compile_train_step, init_state, make_setup

    mesh = sharding.mesh_from_config(config.mesh, devices)
    t0 = time.perf_counter()
    setup = make_setup(config, mesh)
    compiled = compile_train_step(setup)
    compile_s = time.perf_counter() - t0
    state = init_state(setup, config.seed)
    batch_size, n_dev = config.train.batch_size, len(devices)
    model_flops = mfu_lib.clip_train_flops(config.model, batch_size) / n_dev
    hw_flops = hlo_flops.compiled_flops(compiled)
    peak, peak_source = mfu_lib.peak_flops_per_device(devices[0], config.model.dtype)
    base = {"model": config.model.size if config.model.size else "custom", "batch": batch_size,
            "dtype": config.model.dtype, "remat": config.model.remat, "devices": n_dev}
    if args.config != "configs/clip.py":
        base["config"] = os.path.basename(args.config.split(":")[0])
    worker = None
    if args.vs == "openclip":
        worker = OpenClipWorker(openclip_spec(config, len(cores) if cores else os.cpu_count(), args.warmup), cores)
    elif args.vs == "decoder":
        worker = DecoderStep(config, mesh, args.warmup)
    rows = []
    try:
        for data in args.data:
            if data == "excluded":
                batch = device_batch(setup)
                next_batch = lambda: batch
            elif data == "included":
                from clipjax.data import train_input

                from clipjax.data.locca import DecoderTargets

                it = train_input.make_train_iterator(
                    config.data, global_batch_size=batch_size, image_size=config.model.image.image_size,
                    context_length=config.model.text.context_length, seed=config.seed, mesh=mesh,
                    decoder=DecoderTargets.from_config(config))
                next_batch = lambda: next(it)
            else:
                raise SystemExit(f"--data={data!r}: choose excluded or included")
            box, usage = [state], []  # usage: (page faults, kernel seconds) a step, each round

            def run_round(n=args.steps):
                before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                for _ in range(n):
                    box[0], _ = compiled(box[0], next_batch())
                jax.block_until_ready(box[0])
                elapsed, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
                per = max(n, 1)
                usage.append(((after.ru_minflt - before.ru_minflt) / per, (after.ru_stime - before.ru_stime) / per))
                return elapsed

            run_round(args.warmup)
            other = (lambda: worker.run(args.steps)) if worker is not None and data == "excluded" else None
            mine, theirs = _timed_rounds(run_round, args.rounds, other)
            state = box[0]
            step_s = statistics.median(mine) / args.steps
            row = dict(base, data=data, step_s=step_s, samples_per_s=batch_size / step_s,
                       mfu=mfu_lib.mfu(model_flops, step_s, peak),
                       hfu=mfu_lib.mfu(hw_flops, step_s, peak) if hw_flops else float("nan"),
                       compile_s=compile_s, **_peak_memory(compiled, devices))
            if theirs and args.vs == "decoder":
                row["decoder_step_s"] = statistics.median(theirs) / args.steps
                row["decoder_step_ratio"] = statistics.median(t / m for m, t in zip(mine, theirs))
            elif theirs:
                row["openclip_samples_per_s"] = batch_size * args.steps / statistics.median(theirs)
                row["vs_openclip"] = statistics.median(t / m for m, t in zip(mine, theirs))
            row["faults/step"] = statistics.median(u[0] for u in usage[1:])  # after the warm-up round
            row["kernel_s/step"] = statistics.median(u[1] for u in usage[1:])
            row["GFLOP_model/dev"] = model_flops / 1e9
            row["GFLOP_hw/dev"] = (hw_flops or float("nan")) / 1e9
            row["peak_source"] = peak_source
            rows.append(row)
            if data == "included":
                it.close()
    finally:
        if worker is not None:
            worker.close()
    return rows


class DecoderStep:
    """The same step with the LocCa decoder on: ``run(steps)`` times that many steps (seconds)."""

    def __init__(self, config, mesh, warmup: int):
        import ml_collections

        from clipjax import config as config_lib
        from clipjax.train_step import compile_train_step, init_state, make_setup

        config = ml_collections.ConfigDict(config.to_dict())  # a copy; the decoder's sizes are already derived
        config.model.decoder.enabled = True
        config = config_lib.validate(config, mesh.size)
        self.setup = make_setup(config, mesh)
        self.step = compile_train_step(self.setup)
        self.state = init_state(self.setup, config.seed)
        self.batch = device_batch(self.setup, seed=1)
        self.run(warmup)

    def run(self, steps: int) -> float:
        import jax

        t = time.perf_counter()
        for _ in range(steps):
            self.state, _ = self.step(self.state, self.batch)
        jax.block_until_ready(self.state)
        return time.perf_counter() - t

    def close(self) -> None:
        self.state = None


def config_device_count(args) -> int:
    """Devices the config's mesh names when every axis is fixed (the demo: 8), else 1."""
    from clipjax import config as config_lib, sharding

    sizes = sharding.mesh_axis_sizes(config_lib.load_config(args.config, [f"--config.{s}" for s in args.set]).mesh)
    return 1 if any(s < 1 for s in sizes) else math.prod(sizes)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    cores = set(os.sched_getaffinity(0))
    if args.threads:
        cores = set(sorted(cores)[:args.threads])
    os.sched_setaffinity(0, cores)  # before jax starts its thread pools
    # On CPU the step runs on the devices its config was written for (simulated ones, as
    # `make demo` runs): many small ops keep both cores busier split over devices.
    wanted = args.devices or config_device_count(args)
    host_env.request_cpu_devices(wanted)
    host_env.reuse_heap()  # called from Python too (no entry point): before JAX's CPU client starts
    import jax

    if jax.default_backend() == "cpu":
        devices = host_env.cpu_devices(wanted)
    else:
        devices = jax.devices()[:args.devices] if args.devices else jax.devices()
    from clipjax.bench.table import emit

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.model:
            for batch in args.batch:
                for dtype in args.dtype:
                    for remat in args.remat:
                        config = case_config(args, model, batch, dtype, remat, args.data_dir or tmp, len(devices))
                        case = bench_case(config, devices, args, cores)
                        rows += case
                        if not args.json:
                            for r in case:
                                print(f"  {r['model']} B={r['batch']} {r['dtype']} remat={r['remat']} "
                                      f"data {r['data']}: {r['step_s']:.3f} s/step", flush=True)
    emit(rows, as_json=args.json)
    if not args.json and jax.default_backend() == "cpu":
        from clipjax.bench.table import cpu_model

        print(f"cpu: {cpu_model()}")  # CPU figures hold for this CPU only
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
