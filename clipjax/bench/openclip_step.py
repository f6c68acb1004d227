"""The OpenCLIP side of `clipjax-bench train --vs=openclip`, run in its own process.

``python -m clipjax.bench.openclip_step '<json spec>'`` builds the same two-tower
model in open-clip-torch (fp32; on a CUDA GPU, with ``amp_bf16``, under bf16 autocast as
OpenCLIP's ``--precision amp_bf16`` trains), a random batch, ``ClipLoss``, clip-norm and
``torch.optim.AdamW`` with the same hyper-parameters and decay mask, runs the
warm-up steps, prints ``ready``, then answers each stdin line ``run N`` with the
seconds N steps took. ``quit`` (or end of input) ends it. It imports no jax,
so the two frameworks never share a process or a thread pool.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import types
from typing import Any

# PyPI's torchvision (pulled in by open_clip) cannot import beside the CPU-only torch wheel.
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("stub"))

_POOLS = {"tok": "tok", "gap": "avg"}  # clipjax image pool -> OpenCLIP pool_type
_TEXT_POOLS = {"eot": "argmax", "last": "last"}


def build(spec: dict[str, Any]):
    """(model, step function) for ``spec`` (see ``clipjax.bench.train.openclip_spec``)."""
    import torch
    from open_clip.loss import ClipLoss
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    im, tx = spec["image"], spec["text"]
    vision = CLIPVisionCfg(layers=im["depth"], width=im["width"], head_width=im["width"] // im["heads"],
                           mlp_ratio=im["mlp_dim"] / im["width"], patch_size=im["patch_size"],
                           image_size=im["image_size"], no_ln_pre=not im["ln_pre"], pool_type=_POOLS[im["pool"]])
    text = CLIPTextCfg(context_length=tx["context_length"], vocab_size=tx["vocab_size"], width=tx["width"],
                       heads=tx["heads"], layers=tx["depth"], mlp_ratio=tx["mlp_dim"] / tx["width"],
                       no_causal_mask=not tx["causal"], pool_type=_TEXT_POOLS[tx["pool"]])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = bool(spec.get("amp_bf16"))
    if amp and device.type != "cuda":
        raise SystemExit("--vs=openclip: a bf16 comparison runs OpenCLIP under CUDA autocast and needs a GPU; "
                         "on a CPU pass --dtype=float32")
    model = CLIP(spec["embed_dim"], vision, text, quick_gelu=spec["act"] == "quick_gelu").float().train().to(device)
    # clipjax's decay mask: matrices only; no biases, norms, embeddings or logit scale.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or "embedding" in name or "logit_scale" in name or ".ln" in name or name.startswith("ln")
        (no_decay if skip else decay).append(p)
    o = spec["optim"]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=o["lr"], betas=(o["b1"], o["b2"]), eps=o["eps"])
    loss_fn = ClipLoss()
    b = spec["batch"]
    images = torch.randn(b, 3, im["image_size"], im["image_size"], device=device)
    ids = torch.randint(1, tx["vocab_size"] - 1, (b, tx["context_length"]), device=device)
    ids[:, -1] = tx["vocab_size"] - 1  # an end token in every caption
    max_log_scale = math.log(spec["max_logit_scale"])

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            zimg, ztxt, scale = model(images, ids)
            loss = loss_fn(zimg, ztxt, scale)
        loss.backward()
        if o["clip_norm"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o["clip_norm"])
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_log_scale)

    def sync() -> None:  # CUDA runs asynchronously: time only finished work
        if device.type == "cuda":
            torch.cuda.synchronize()

    return model, step, sync


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    if spec.get("cores"):  # pinned here: a preexec_fn would fork the multithreaded JAX parent
        os.sched_setaffinity(0, spec["cores"])
    model, step, sync = build(spec)
    for _ in range(spec["warmup"]):
        step()
    sync()
    print("ready", sum(p.numel() for p in model.parameters()), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        n = int(cmd[1])
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        print(time.perf_counter() - t0, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
