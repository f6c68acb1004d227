"""`clipjax-bench loss`: per-device memory and step time of each contrastive-loss impl.

For each global batch and impl, compiles forward + backward (gradients with
respect to both embeddings and the scale) on N simulated CPU devices and reports
the executable's per-device temporary memory from XLA's memory analysis. Batches
up to ``--time_max_batch`` are also run and timed (median of ``--repeats``).

    clipjax-bench loss --batch=32768 --dim=512
    clipjax-bench loss --batch=131072 --dim=768 --impls=ring,chunked --time_max_batch=0
    clipjax-bench loss --devices=256 --batch=1048576 --dim=768 --impls=ring --time_max_batch=0
"""

from __future__ import annotations

import time

from clipjax.host_env import simulated_cpu_devices
from clipjax.errors import ArgumentParser


def _csv(kind):
    return lambda s: [kind(v) for v in s.split(",") if v]


def _parse(argv):
    p = ArgumentParser(prog="clipjax-bench loss", doc=__doc__)
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices (the batch axis)")
    p.add_argument("--batch", type=_csv(int), default=[8192, 32768], help="global batch sizes, comma-separated")
    p.add_argument("--dim", type=int, default=512, help="embedding width D")
    p.add_argument("--kind", default="softmax", choices=["softmax", "sigmoid"])
    p.add_argument("--impls", type=_csv(str), default=["dense", "allgather", "chunked", "ring"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--chunk_size", type=int, default=None, help="column tile (default: the loss's own choice)")
    p.add_argument("--time_max_batch", type=int, default=8192, help="run and time batches up to this size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max_dense_batch", type=int, default=32768,
                   help="skip dense (one device holds the global matrix) above this batch")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def measure(batch: int, dim: int, kind: str, impl: str, dtype, mesh, chunk_size, run: bool, repeats: int) -> dict:
    """Compiles (and optionally times) value_and_grad of the loss for one configuration."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from clipjax import losses, sharding

    sh = sharding.batch_sharding(mesh, 2)
    bias = jnp.float32(-10.0) if kind == "sigmoid" else None

    def loss(x, y, scale):
        return losses.contrastive_loss(x, y, scale, bias, kind=kind, impl=impl, mesh=mesh, chunk_size=chunk_size)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    spec = jax.ShapeDtypeStruct((batch, dim), dtype, sharding=sh)
    t0 = time.perf_counter()
    compiled = fn.lower(spec, spec, jax.ShapeDtypeStruct((), jnp.float32)).compile()
    row = {
        "batch": batch, "devices": mesh.size, "dim": dim, "kind": kind, "impl": impl,
        "temp_MiB": compiled.memory_analysis().temp_size_in_bytes / 2**20,
        "compile_s": time.perf_counter() - t0,
    }
    if run:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(batch, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        args = (jax.device_put(x.astype(dtype), sh), jax.device_put(x.astype(dtype), sh), jnp.float32(10.0))
        jax.block_until_ready(compiled(*args))  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t0)
        row["step_s"] = sorted(times)[len(times) // 2]
    return row


def main(argv: list[str]) -> int:
    args = _parse(argv)
    devices = simulated_cpu_devices(args.devices)
    import jax.numpy as jnp

    from clipjax import sharding
    from clipjax.bench.table import emit

    mesh = sharding.make_mesh({"data": args.devices, "fsdp": 1, "tensor": 1}, devices=devices)
    rows = []
    for batch in args.batch:
        run = batch <= args.time_max_batch
        base = None
        for impl in args.impls:
            if impl == "dense" and batch > args.max_dense_batch:
                continue
            row = measure(batch, args.dim, args.kind, impl, jnp.dtype(args.dtype), mesh, args.chunk_size, run,
                          args.repeats)
            if impl == "allgather":
                base = row
            rows.append(row)
            if not args.json:
                print(f"  {impl} B={batch}: {row['temp_MiB']:.1f} MiB", flush=True)
        if base is not None:  # ratios within one run, against the all-gathered logits
            for row in rows:
                if row["batch"] == batch:
                    row["mem_vs_allgather"] = row["temp_MiB"] / base["temp_MiB"]
                    if "step_s" in row and "step_s" in base:
                        row["time_vs_allgather"] = row["step_s"] / base["step_s"]
    emit(rows, as_json=args.json)
    return 0
