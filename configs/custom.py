"""Small towers on your own labelled images: convert, train on a CPU or one GPU, evaluate.

The documented path (README "Train on your own images")::

    clipjax-data convert folder photos/train --out=data/mine
    clipjax-data convert folder photos/test --out=data/mine --split=test
    clipjax-train --config=configs/custom.py:data=data/mine --workdir=runs/mine
    clipjax-eval  --config=configs/custom.py:data=data/mine --workdir=runs/mine

Zero-shot classification reads the class names the converter wrote
(``<data>/classes.txt``) and the labels of the ``eval_split`` records; retrieval
uses the same split's captions.

Argument (comma-separated ``key=value``):
  data        folder written by ``clipjax-data convert`` (required)
  steps       training steps (default 500)
  batch       global batch size (default 64)
  image_size  pixels per side (default 64; a multiple of 8)
  eval_split  labelled split for zero-shot and retrieval (default test; "" for none)
  templates   zero-shot prompts: a built-in name or a file (default single: "a photo of a {}.")
"""

import os

from clipjax.config import base_config, parse_arg
from clipjax.errors import UserError
from clipjax.evals.config import retrieval_eval, zeroshot_eval


def get_config(arg=None):
    a = parse_arg(arg, data="", steps=500, batch=64, image_size=64, eval_split="test", templates="single")
    if not a.data:
        raise UserError("configs/custom.py needs data=DIR (the --out folder of clipjax-data convert): "
                        "configs/custom.py:data=/path/to/shards")
    c = base_config()
    c.seed = 0
    m = c.model
    m.size = "tiny"
    m.dtype = "float32"  # bf16 matmuls are slow on CPUs
    m.image.update(image_size=a.image_size, patch_size=8, width=128, depth=4, heads=4, mlp_dim=512, pool="gap")
    m.text.update(width=128, depth=4, heads=4, mlp_dim=512, context_length=64, pool="last")
    m.embed_dim = 128
    m.scan = True

    c.loss.kind = "softmax"
    c.loss.impl = "chunked"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1  # every device holds a slice of the batch

    c.optim.lr = 1e-3
    c.optim.weight_decay = 0.1
    c.optim.warmup_steps = min(50, a.steps // 10)
    c.optim.clip_norm = 1.0

    c.train.batch_size = a.batch
    c.train.steps = a.steps
    c.train.log_every = max(1, min(50, a.steps // 10))
    c.checkpoint.every = max(1, min(500, a.steps))
    c.checkpoint.keep = 2

    c.data.source = "arrayrecord"
    c.data.path = a.data
    c.data.tokenizer = "bytes"  # needs no vocabulary file; captions of a few words fit 64 bytes

    if a.eval_split:
        c.evals.zeroshot = zeroshot_eval(source="arrayrecord", path=a.data, split=a.eval_split,
                                         classnames=os.path.join(a.data, "classes.txt"), templates=a.templates)
        c.evals.retrieval = retrieval_eval(source="arrayrecord", path=a.data, split=a.eval_split)
    return c
