"""CLIP (softmax InfoNCE) pretraining, OpenCLIP-style recipe.

Argument: comma-separated ``key=value`` (e.g. ``configs/clip.py:model=B/16,batch=32768``):
  model   row of the size table (tiny, S/32, S/16, B/32, B/16, L/14, H/14, g/14)
  batch   global batch size
  steps   training steps
  impl    loss implementation (dense, allgather, chunked, ring)
  data    folder of ArrayRecord shards written by `clipjax-data convert`
"""

from clipjax.config import base_config, parse_arg


def get_config(arg=None):
    a = parse_arg(arg, model="B/32", batch=32768, steps=20000, impl="chunked", data="")
    c = base_config()
    c.model.size = a.model
    c.loss.kind = "softmax"
    c.loss.impl = a.impl
    c.train.batch_size = a.batch
    c.train.steps = a.steps
    c.optim.warmup_steps = min(2000, a.steps // 10)
    c.mesh.data, c.mesh.fsdp = 1, -1  # FSDP over every device by default
    c.model.remat = "dots_no_batch"
    c.data.source = "arrayrecord"
    c.data.path = a.data
    c.data.tokenizer = "clip"
    return c
