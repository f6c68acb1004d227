"""`clipjax-bench vocab`: per-device memory of the decoder's cross-entropy against the vocabulary size.

For each vocabulary size, compiles the gradient of the mean token NLL (``vocab_loss``)
with respect to the decoder features and the output kernel on N simulated CPU
devices (features sharded over the batch, the kernel replicated) and reports the
executable's per-device temporaries from XLA's memory analysis; ``loss_mib_per_device``
is what is left after the kernel's gradient (which grows with the vocabulary whatever
the loss does, and is sharded like the kernel in training), beside the float32
``[batch x length, vocab]`` logits a device would otherwise hold.

    clipjax-bench vocab --vocab=32768,65536,131072,262144 --batch=256 --length=64 --width=768
"""

from __future__ import annotations

from clipjax.host_env import simulated_cpu_devices
from clipjax.bench.loss import _csv
from clipjax.errors import ArgumentParser


def _parse(argv):
    p = ArgumentParser(prog="clipjax-bench vocab", doc=__doc__)
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices (the batch axis)")
    p.add_argument("--vocab", type=_csv(int), default=[32768, 65536, 131072, 262144], help="vocabulary sizes")
    p.add_argument("--batch", type=int, default=256, help="global batch (examples)")
    p.add_argument("--length", type=int, default=64, help="decoder tokens per example")
    p.add_argument("--width", type=int, default=768, help="decoder width D")
    p.add_argument("--chunk", type=int, default=8192, help="vocabulary columns per chunk (loss.decoder.vocab_chunk)")
    p.add_argument("--impls", type=_csv(str), default=["chunked", "dense"])
    p.add_argument("--max_dense_vocab", type=int, default=65536, help="skip dense above this vocabulary")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def measure(vocab: int, impl: str, args, mesh) -> dict:
    import jax
    import jax.numpy as jnp

    from clipjax import sharding, vocab_loss

    def loss(h, w, t):
        nll = (vocab_loss.sequence_nll(h, w, t, args.chunk) if impl == "chunked"
               else vocab_loss.dense_sequence_nll(h, w, t))
        return jnp.mean(nll)

    b, t, d = args.batch, args.length, args.width
    specs = (jax.ShapeDtypeStruct((b, t, d), jnp.float32, sharding=sharding.batch_sharding(mesh, 3)),
             jax.ShapeDtypeStruct((d, vocab), jnp.float32, sharding=sharding.replicated(mesh)),
             jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=sharding.batch_sharding(mesh, 2)))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*specs).compile()
    mib = 2.0**20
    temp, grad = compiled.memory_analysis().temp_size_in_bytes / mib, d * vocab * 4 / mib
    return {"vocab": vocab, "impl": impl, "devices": mesh.size, "tokens_per_device": b * t // mesh.size,
            "temp_mib_per_device": temp, "kernel_grad_mib": grad, "loss_mib_per_device": temp - grad,
            "logits_mib_per_device": b * t // mesh.size * vocab * 4 / mib}


def main(argv: list[str]) -> int:
    args = _parse(argv)
    devices = simulated_cpu_devices(args.devices)
    from clipjax import sharding
    from clipjax.bench.table import emit

    mesh = sharding.make_mesh({"data": len(devices), "fsdp": 1, "tensor": 1}, devices=devices)
    rows = [measure(v, impl, args, mesh) for v in args.vocab for impl in args.impls
            if impl == "chunked" or v <= args.max_dense_vocab]
    emit(rows, args.json)
    return 0
