"""Layered configs: base defaults -> a config file's get_config(arg) -> --config.a.b=VALUE.

Config files in ``configs/`` start from ``base_config()`` and change what they
need. ``load_config("configs/clip.py:model=B/16,batch=32768", ["--config.train.steps=10"])``
and the command line go through the same parser (ml_collections config_flags),
so unknown keys and wrong types fail the same way, naming the key. ``validate()``
derives values and checks divisibility before anything is compiled.
"""

from __future__ import annotations

import ast
import math
from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict

from clipjax import sharding
from clipjax.models.layers import ACTIVATIONS, REMAT_POLICIES
from clipjax.models.sizes import get_size
from clipjax.models.towers import IMAGE_POOLS, TEXT_POOLS

LOSS_KINDS = ("softmax", "sigmoid")
LOSS_IMPLS = ("dense", "allgather", "chunked", "ring")
SCHEDULES = ("cosine", "rsqrt", "constant")


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses a config argument ``"model=B/16,batch=32768,flag"`` into typed values.

    Keys must be among ``defaults``; values take the type of their default
    (a bare key sets a bool to True).
    """
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"config argument {key!r} is unknown; known: {sorted(defaults)}")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key}={value!r}: expected true/false")
            out[key] = value.lower() in ("true", "1")
        elif isinstance(default, int):
            out[key] = int(value)
        elif isinstance(default, float):
            out[key] = float(value)
        elif isinstance(default, str) or default is None:
            out[key] = value
        else:
            out[key] = type(default)(ast.literal_eval(value))
    return ml_collections.ConfigDict(out)


def _model_config() -> ml_collections.ConfigDict:
    ph = config_dict.placeholder
    return ml_collections.ConfigDict({
        "size": "tiny",  # row of clipjax.models.sizes.SIZES; unset tower fields come from it
        "embed_dim": ph(int),
        "image": {
            "width": ph(int), "depth": ph(int), "heads": ph(int), "mlp_dim": ph(int), "patch_size": ph(int),
            "image_size": 224,
            "pool": "tok",  # tok (class token) | gap (global average) | map (attention pooling)
            "class_token": True,
            "ln_pre": True,  # OpenAI CLIP normalises tokens before the first block
        },
        "text": {
            "width": ph(int), "depth": ph(int), "heads": ph(int), "mlp_dim": ph(int),
            "vocab_size": ph(int),  # derived from data.tokenizer: 49408 clip, 259 bytes
            "context_length": 77,
            "pool": "eot",  # eot (the end-of-text token) | last (last non-pad token)
            "causal": True,
            "pad_id": 0,
            "eot_id": ph(int),  # derived from data.tokenizer: 49407 clip, 2 bytes
        },
        "act": "gelu",  # gelu | gelu_tanh | quick_gelu (OpenAI's original weights)
        "ln_eps": 1e-5,
        "dtype": "bfloat16",  # compute dtype; params and optimizer state stay float32
        "remat": "none",  # none | full | dots | dots_no_batch (per block)
        "scan": True,  # scan over blocks: compile time independent of depth
        "init_logit_scale": ph(float),  # derived: log(1/0.07) softmax, log(10) sigmoid
        "max_logit_scale": 100.0,
        "init_logit_bias": ph(float),  # derived: -10 for sigmoid, none for softmax
    })


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default; config files start here."""
    from clipjax.data.config import data_config
    from clipjax.evals.config import evals_config

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = _model_config()
    c.loss = ml_collections.ConfigDict({
        "kind": "softmax",  # softmax (CLIP InfoNCE) | sigmoid (SigLIP)
        "impl": "chunked",  # dense | allgather | chunked | ring
        "chunk_size": config_dict.placeholder(int),  # column tile for chunked/ring; unset: chosen from memory
    })
    c.mesh = ml_collections.ConfigDict({
        "data": -1, "fsdp": 1, "tensor": 1,  # within a slice; one size may be -1
        "dcn_data": 1, "dcn_fsdp": 1, "dcn_tensor": 1,  # across slices (multi-slice pods)
    })
    c.sharding = ml_collections.ConfigDict({
        "rules": (),  # ((logical_axis, mesh_axis_or_None), ...) overriding sharding.DEFAULT_RULES
    })
    c.optim = ml_collections.ConfigDict({
        "lr": 5e-4, "b1": 0.9, "b2": 0.98, "eps": 1e-6, "weight_decay": 0.2,
        "schedule": "cosine",  # cosine | rsqrt | constant (all after linear warmup)
        "warmup_steps": 2000,
        "min_lr_ratio": 0.0,  # cosine floor as a fraction of lr
        "clip_norm": 1.0,  # global-norm clipping; 0 disables
        "image_lr_mult": 1.0, "text_lr_mult": 1.0,
        "lock_image": False, "lock_text": False,  # LiT: freeze a tower
    })
    c.train = ml_collections.ConfigDict({
        "batch_size": 32768,  # global
        "steps": 10000,
        "grad_accum": 1,  # micro-batches per step (exact for contrastive losses)
        "log_every": 50,
        "max_consecutive_skips": 10,  # non-finite steps in a row before the run stops
        "loss_spike_factor": 0.0,  # stop when the loss exceeds this times its running mean (0: off)
        "loss_spike_window": 50,  # steps in that running mean (the check starts once it is full)
        "report": True,  # PNG report of the curves at the end
    })
    c.checkpoint = ml_collections.ConfigDict({
        "every": 1000,
        "keep": 3,
        "async_save": True,
        "init_from": "",  # a checkpoint dir (or workdir) to initialise params from (fine-tuning)
    })
    c.data = data_config()
    c.evals = evals_config()
    return c


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads ``path[:arg]`` and applies ``--config.a.b=VALUE`` overrides, like the CLI."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["clipjax", f"--config={spec}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", default=None, flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def _fill(section: ml_collections.ConfigDict, defaults: dict[str, Any]) -> None:
    for key, value in defaults.items():
        if isinstance(value, dict):
            _fill(section[key], value)
        elif section[key] is None:
            section[key] = value


def _check_choice(value: Any, choices: Sequence[Any], key: str) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r}; choose one of {list(choices)}")


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None) -> ml_collections.ConfigDict:
    """Derives unset values and checks consistency; returns the same (mutated) config.

    With ``num_devices`` it also resolves the mesh and checks that the global
    batch (and micro-batch) divides over the data-parallel axes.
    """
    with c.unlocked():
        m = c.model
        _fill(m, {k: v for k, v in get_size(m.size).items()})
        for tower in ("image", "text"):
            t = m[tower]
            if t.width % t.heads:
                raise ValueError(f"model.{tower}.width={t.width} is not divisible by model.{tower}.heads={t.heads}")
        if m.image.image_size % m.image.patch_size:
            raise ValueError(f"model.image.image_size={m.image.image_size} is not divisible by "
                             f"model.image.patch_size={m.image.patch_size}")
        _check_choice(m.image.pool, IMAGE_POOLS, "model.image.pool")
        _check_choice(m.text.pool, TEXT_POOLS, "model.text.pool")
        _check_choice(m.act, list(ACTIVATIONS), "model.act")
        _check_choice(m.remat, list(REMAT_POLICIES), "model.remat")
        _check_choice(m.dtype, ["float32", "bfloat16", "float16"], "model.dtype")
        from clipjax.data.tokenizer import ByteTokenizer

        tokenizer_vocab = {"clip": 49408, "bytes": ByteTokenizer.vocab_size}.get(c.data.tokenizer)
        if m.text.eot_id is None:
            m.text.eot_id = {"clip": 49407, "bytes": ByteTokenizer.eot_id}.get(c.data.tokenizer)
        if m.text.vocab_size is None:
            m.text.vocab_size = tokenizer_vocab or 49408
        elif tokenizer_vocab and m.text.vocab_size < tokenizer_vocab:
            raise ValueError(f"model.text.vocab_size={m.text.vocab_size} is smaller than the "
                             f"{c.data.tokenizer!r} tokenizer's vocabulary ({tokenizer_vocab})")
        _check_choice(c.loss.kind, LOSS_KINDS, "loss.kind")
        _check_choice(c.loss.impl, LOSS_IMPLS, "loss.impl")
        sigmoid = c.loss.kind == "sigmoid"
        if m.init_logit_scale is None:
            m.init_logit_scale = math.log(10.0) if sigmoid else math.log(1 / 0.07)
        if m.init_logit_bias is None and sigmoid:
            m.init_logit_bias = -10.0
        if m.max_logit_scale <= 0:
            raise ValueError(f"model.max_logit_scale={m.max_logit_scale} must be positive")

        o = c.optim
        _check_choice(o.schedule, SCHEDULES, "optim.schedule")
        if o.lock_image and o.lock_text:
            raise ValueError("optim.lock_image and optim.lock_text are both set: nothing would train")
        for key in ("lr", "eps"):
            if o[key] <= 0:
                raise ValueError(f"optim.{key}={o[key]} must be positive")

        t = c.train
        for key in ("batch_size", "steps", "grad_accum", "log_every", "loss_spike_window"):
            if t[key] <= 0:
                raise ValueError(f"train.{key}={t[key]} must be positive")
        if t.batch_size % t.grad_accum:
            raise ValueError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
        if t.loss_spike_factor < 0 or 0 < t.loss_spike_factor <= 1:
            raise ValueError(f"train.loss_spike_factor={t.loss_spike_factor} must be 0 (off) or above 1")
        if c.checkpoint.every <= 0 or c.checkpoint.keep <= 0:
            raise ValueError("checkpoint.every and checkpoint.keep must be positive")

        sharding.rules_from_config(c.sharding.rules)
        if num_devices is not None:
            dcn = {a: c.mesh[f"dcn_{a}"] for a in sharding.MESH_AXES}
            slices = math.prod(dcn.values())
            if num_devices % slices:
                raise ValueError(f"mesh: {num_devices} devices do not split into {slices} dcn slices")
            ici = sharding.resolve_mesh_shape({a: c.mesh[a] for a in sharding.MESH_AXES}, num_devices // slices)
            for a in sharding.MESH_AXES:
                c.mesh[a] = ici[a]
            dp = math.prod(ici[a] * dcn[a] for a in sharding.BATCH_AXES)
            if t.batch_size % (dp * t.grad_accum):
                raise ValueError(
                    f"train.batch_size={t.batch_size} must be divisible by the data-parallel size {dp} "
                    f"(mesh data x fsdp) times train.grad_accum={t.grad_accum}")
        from clipjax.data.config import validate_data_config
        from clipjax.evals.config import validate_evals_config

        validate_data_config(c.data)
        validate_evals_config(c.evals)
    return c
