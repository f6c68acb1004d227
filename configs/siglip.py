"""SigLIP (sigmoid loss) pretraining: bias -10, log-scale log(10), b2 0.95.

Argument: as configs/clip.py (model, batch, steps, impl, data).
"""

from clipjax.config import base_config, parse_arg


def get_config(arg=None):
    a = parse_arg(arg, model="B/16", batch=32768, steps=20000, impl="chunked", data="")
    c = base_config()
    c.model.size = a.model
    c.model.image.pool = "map"
    c.model.text.pool = "last"
    c.loss.kind = "sigmoid"
    c.loss.impl = a.impl
    c.train.batch_size = a.batch
    c.train.steps = a.steps
    c.optim.b2 = 0.95  # stabilises large-batch sigmoid training
    c.optim.lr = 1e-3
    c.optim.weight_decay = 1e-4
    c.optim.warmup_steps = min(2000, a.steps // 10)
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.model.remat = "dots_no_batch"
    c.data.source = "arrayrecord"
    c.data.path = a.data
    c.data.tokenizer = "clip"
    return c
