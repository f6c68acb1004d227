"""The embedded default: CLIP on the synthetic shapes dataset, on a laptop CPU.

`make demo` runs it on 8 simulated CPU devices (mesh data=4 x fsdp=2): the
synthetic dataset is generated on first use, tiny towers train for a few
minutes, and zero-shot accuracy on the held-out split (attribute combinations
never seen in training) and retrieval recall are printed at the end.

Argument (optional): ``steps=N``, ``batch=N``, ``smoke`` (a seconds-long run
with the smallest towers, used by the tests), ``data=DIR`` (where the synthetic
dataset lives; default ``workdirs/synthetic``, ``workdirs/synthetic-smoke`` with
``smoke``, whose dataset is smaller), ``decoder`` (SigLIP 2's LocCa decoder trained
beside the towers on the shapes' captions and boxes, with a captioning / referring
evaluation), ``naflex=L`` (SigLIP 2's switch: the last tenth of the
steps and evaluation take NaFlex input of at most L patches).
"""

from clipjax.config import base_config, parse_arg
from clipjax.evals.config import captioning_eval, retrieval_eval, zeroshot_eval


def get_config(arg=None):
    a = parse_arg(arg, steps=1500, batch=128, smoke=False, data="", decoder=False, naflex=0)
    c = base_config()
    c.seed = 0
    m = c.model
    m.size = "tiny"
    m.dtype = "float32"  # bf16 matmuls are slow on CPUs
    # 32 px images in 4 px patches resolve the shapes; two narrow layers per tower keep a
    # step near 0.3 s on 2 cores (measured figures: docs/benchmarks.md).
    m.image.update(image_size=32, patch_size=4, width=64, depth=2, heads=2, mlp_dim=256, pool="gap")
    m.text.update(width=64, depth=2, heads=2, mlp_dim=256, context_length=32, pool="last")
    m.embed_dim = 64
    # Unrolled, the two blocks step ~10% faster on CPU, but draw other initial weights: 72.6% zero-shot
    # at 1500 steps instead of 85.5% (docs/benchmarks.md), so the demo keeps the scan.
    m.scan = True

    c.loss.kind = "softmax"
    c.loss.impl = "chunked"

    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 4, 2, 1

    c.optim.lr = 2e-3
    c.optim.weight_decay = 0.1
    c.optim.warmup_steps = 50
    c.optim.clip_norm = 1.0

    c.train.batch_size = a.batch
    c.train.steps = a.steps
    c.train.log_every = 50
    c.checkpoint.every = 300
    c.checkpoint.keep = 2

    c.data.source = "synthetic"
    c.data.path = a.data or ("workdirs/synthetic-smoke" if a.smoke else "workdirs/synthetic")
    c.data.tokenizer = "bytes"
    c.data.num_workers = 0
    c.data.prefetch = 2
    c.data.synth.num_train = 20000
    c.data.synth.num_heldout = 1000

    # Held-out split: attribute combinations never seen in training.
    c.evals.synthetic_zeroshot = zeroshot_eval(source="synthetic", split="heldout", every=0)
    c.evals.synthetic_retrieval = retrieval_eval(source="synthetic", split="heldout", every=0)

    if a.decoder:
        # One block of the text tower's width; 32 coordinate bins: one per image pixel.
        m.decoder.update(enabled=True, width=64, depth=1, heads=2, mlp_dim=256, max_length=32)
        c.loss.decoder.num_bins = 32
        # SigLIP 2 weighs the decoder 1; with these tiny towers that cost 2.7 points of held-out
        # zero-shot, 0.25 none (docs/benchmarks.md).
        c.loss.decoder.weight = 0.25
        c.evals.synthetic_captioning = captioning_eval(source="synthetic", split="heldout", every=0)

    if a.smoke:
        m.image.update(image_size=32, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64)
        m.text.update(width=32, depth=1, heads=2, mlp_dim=64, context_length=48)
        m.embed_dim = 32
        c.train.batch_size = 32 if a.batch == 128 else a.batch
        c.train.steps = 8 if a.steps == 1500 else a.steps
        c.train.log_every = 1
        c.checkpoint.every = 4
        c.optim.warmup_steps = 2
        c.data.synth.num_train = 512
        c.data.synth.num_heldout = 64
        c.train.report = False
        c.evals.synthetic_zeroshot.every = 4
        c.evals.synthetic_retrieval.max_examples = 64
        if a.decoder:
            m.decoder.update(width=32, heads=2, mlp_dim=64)
            c.evals.synthetic_captioning.max_examples = 64
    if a.naflex:
        c.train.stages = ((c.train.steps - c.train.steps // 10, m.image.image_size, m.text.context_length),)
        m.image.seq_len = a.naflex
    return c
