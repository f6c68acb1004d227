"""SigLIP: the SigLIP architecture (transformers' SiglipModel, big_vision's two_towers) and its recipe:
sigmoid loss, bias -10, log-scale log(10), b2 0.95.

Argument: comma-separated ``key=value``:
  model      a SigLIP row of the size table (siglip-B/16, siglip-L/16, siglip-So400m/14,
             siglip-So400m/16, siglip2-g-opt/16) or any other row (tiny for tests)
  family     siglip | siglip-i18n | siglip2: picks the released image size and text length
             (models.sizes.RELEASES; SigLIP 2 texts are 64 tokens)
  tokenizer  data.tokenizer, e.g. sentencepiece:/path/spiece.model (SigLIP) or hf:/path/dir (SigLIP 2's Gemma)
  batch, steps, impl, data   as configs/clip.py
Fine-tune a released model: --config.checkpoint.init_from=HF_DIR or FILE.npz.
"""

from clipjax.config import base_config, parse_arg
from clipjax.models.sizes import RELEASES, get_size


def get_config(arg=None):
    a = parse_arg(arg, model="siglip-B/16", family="siglip", tokenizer="clip", batch=32768, steps=20000,
                  impl="chunked", data="")
    c = base_config()
    m = c.model
    m.size = a.model
    # The SigLIP towers: biased patch embedding, no class token or pre-norm, MAP head, no image
    # projection; text attends to its pads, pooled at the final position, biased head; GELU tanh, eps 1e-6.
    m.image.update(pool="map", class_token=False, ln_pre=False, patch_bias=True, proj=False, norm="siglip")
    m.text.update(pool="final", causal=False, pad_mask=False, proj_bias=True)
    m.embed_dim = get_size(a.model)["image"]["width"]  # no image projection: the embedding is its width
    m.act = "gelu_tanh"
    m.ln_eps = 1e-6
    releases = [r for r in RELEASES.get(a.model, ()) if r[0] == a.family]
    if releases:
        _, m.image.image_size, m.text.context_length, _ = releases[0]
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
    c.data.tokenizer = a.tokenizer
    return c
