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
import os
import re
from typing import Any, Callable, Sequence

import ml_collections
from ml_collections import config_dict

from clipjax import losses, optim, sharding
from clipjax.data.config import data_config, validate_data_config
from clipjax.data import tokenizer as tokenizer_lib
from clipjax.data.transforms import ImageOptions
from clipjax.errors import ConfigError, closest, did_you_mean, one_line
from clipjax.evals.config import evals_config, validate_evals_config
from clipjax.models import DTYPES
from clipjax.models.layers import ACTIVATIONS, REMAT_POLICIES
from clipjax.models.sizes import get_size
from clipjax.models.towers import IMAGE_POOLS, TEXT_POOLS


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
            raise ConfigError(f"config argument {key!r} is unknown{did_you_mean(key, defaults)}; "
                              f"known: {', '.join(sorted(defaults))}")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ConfigError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"config argument {key}={value!r}: expected true/false")
            out[key] = value.lower() in ("true", "1")
        else:
            try:
                if isinstance(default, (int, float)):
                    out[key] = type(default)(value)
                elif isinstance(default, str) or default is None:
                    out[key] = value
                else:
                    out[key] = type(default)(ast.literal_eval(value))
            except (ValueError, SyntaxError) as e:
                raise ConfigError(f"config argument {key}={value!r}: expected a value of type {type(default).__name__} "
                                  f"like {key}={default!r}") from e
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
            "patch_bias": False,  # a bias in the patch embedding (SigLIP)
            "proj": True,  # project the pooled width to embed_dim; False: embed_dim = width (SigLIP)
            "norm": "openai",  # pixel statistics the tower expects: openai (CLIP's mean/std) | siglip (to [-1, 1])
            "mask_ratio": 0.0,  # FLIP: fraction of patches dropped per example in training (0.5, 0.75); eval sees all
            # NaFlex: > 0 feeds each image at its own aspect ratio as at most this many patches (padded to it),
            # the position grid (image_size / patch_size a side) resized per image; 0: fixed image_size crops.
            "seq_len": 0,
        },
        "text": {
            "width": ph(int), "depth": ph(int), "heads": ph(int), "mlp_dim": ph(int),
            "vocab_size": ph(int),  # derived from data.tokenizer: 49408 clip, 259 bytes
            "context_length": 77,
            "pool": "eot",  # eot (the end-of-text token) | last (last non-pad token) | final (position T-1, SigLIP)
            "causal": True,
            "pad_mask": True,  # without causal: pad keys masked; False attends to pads as SigLIP does
            "proj_bias": False,  # a bias in the text projection (SigLIP's head)
            "pad_id": 0,
            "eot_id": ph(int),  # derived from data.tokenizer: 49407 clip, 2 bytes
        },
        "act": "gelu",  # gelu | gelu_tanh | quick_gelu (OpenAI's original weights)
        "ln_eps": 1e-5,
        "dtype": "auto",  # compute dtype (auto: float32 on CPU, bfloat16 on GPU/TPU); params stay float32
        "remat": "none",  # none | full | qkv | matmuls | dots | dots_no_batch (per block)
        "scan": True,  # scan over blocks: compile time independent of depth
        "init_logit_scale": ph(float),  # derived: log(1/0.07) softmax, log(10) sigmoid
        "max_logit_scale": 100.0,
        "init_logit_bias": ph(float),  # derived: -10 for sigmoid, none for softmax
        "decoder": {  # LocCa captioning decoder trained beside the towers (loss.decoder); dropped after training
            "enabled": False,
            # From the size row: the text tower's width, heads and MLP with half its layers.
            "width": ph(int), "depth": ph(int), "heads": ph(int), "mlp_dim": ph(int),
            "max_length": ph(int),  # decoder input tokens; derived: model.text.context_length
            "tied": True,  # output layer = input embedding transposed; False: a kernel of its own
            "vocab_size": ph(int),  # derived: tokenizer + loss.decoder.num_bins coordinates + 4 task/mask ids
        },
    })


def _decoder_loss_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "weight": 1.0,  # times the decoder's mean token NLL, added to the contrastive loss
        # Task mix among examples with a region in their crop (relative frequencies; others caption).
        "mix_cap": 1.0, "mix_aref": 1.0, "mix_gcap": 1.0,
        "parallel_fraction": 0.5,  # CapPa: examples predicting every target at once from mask tokens
        "num_bins": 500,  # quantisation bins per box coordinate (extra vocabulary ids)
        "min_visible": 0.5,  # a region counts when this fraction of its box is inside the training crop
        "vocab_chunk": 8192,  # vocabulary columns per step of the chunked cross-entropy
    })


# The top-level fields of every config, one line each (clipjax-train --help shows them).
SECTIONS = {
    "seed": "random seed of initialisation, data order and augmentation",
    "model": "towers and head: size (tiny, B/32, B/16, L/14, ...), widths, pooling, dtype, remat",
    "loss": "kind (softmax CLIP | sigmoid SigLIP) and impl (dense | allgather | chunked | ring)",
    "mesh": "device mesh sizes: data, fsdp, tensor (one may be -1) and their dcn_* multi-slice factors",
    "sharding": "rules overriding the logical-axis -> mesh-axis table",
    "optim": "AdamW (lr, b1, b2, eps, weight_decay), schedule and warmup, clipping, tower lr / locking",
    "train": "global batch_size, steps, grad_accum, log_every, non-finite skips, report.png",
    "checkpoint": "save cadence (every), retention (keep), async saves, init_from another run",
    "data": "training data: source (arrayrecord | tfds | synthetic), path, tokenizer, augmentation, workers",
    "evals": "named zero-shot / retrieval evaluations and their cadence",
}


def help_lines(spec: str | None, prog: str) -> list[str]:
    """The config part of a command's ``--help``: the top-level sections, then the config file's docstring."""
    lines = ["config fields (top level):", *(f"  {name:<24}{about}" for name, about in SECTIONS.items())]
    if not spec:
        return lines + ["", f"{prog} --config=FILE --help also shows that file's arguments; "
                            f"--config=FILE --print_config prints the resolved config."]
    path = spec.split(":", 1)[0]
    try:
        with open(path, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or "(no docstring)"
    except (OSError, SyntaxError) as e:
        doc = f"(cannot read: {e})"
    return lines + ["", f"{path}:", *("  " + line for line in doc.splitlines())]


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default; config files start here."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = _model_config()
    c.loss = ml_collections.ConfigDict({
        "kind": "softmax",  # softmax (CLIP InfoNCE) | sigmoid (SigLIP)
        "impl": "chunked",  # dense | allgather | chunked | ring
        "chunk_size": config_dict.placeholder(int),  # column tile for chunked/ring; unset: chosen from memory
        "decoder": _decoder_loss_config(),  # LocCa (model.decoder.enabled)
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
        "profile_steps": "",  # "A:B": a jax.profiler trace of steps A..B-1 in WORKDIR/profile (TensorBoard, Perfetto)
        # CLIPA: ((steps, image_size, context_length), ...) run first; the rest at the model's size.
        "stages": (),
        "unmasked_steps": 0,  # FLIP: the last N steps run with mask_ratio 0
    })
    c.checkpoint = ml_collections.ConfigDict({
        "every": 1000,
        "keep": 3,
        "async_save": True,
        "init_from": "",  # checkpoint dir, workdir or OpenCLIP/OpenAI weights file to start params from (fine-tuning)
        "accept_changes": False,  # resume although seed, train.batch_size or the data stream changed (not exact)
        "start_over_if_damaged": False,  # every checkpoint damaged: train from step 0 instead of stopping
    })
    c.data = data_config()
    c.evals = evals_config()
    return c


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads ``path[:arg]`` and applies ``--config.a.b=VALUE`` overrides, like the CLI.

    Every mistake is a ``ConfigError`` naming it and the fix: a missing file, an unknown
    config argument, an unknown field (with the closest valid names), a value of the wrong type.
    """
    from absl import flags
    from ml_collections import config_flags

    path, colon, arg = spec.partition(":")
    c = _load_file(path, arg if colon else None)
    for override in overrides:
        field = override.lstrip("-").split("=", 1)[0].split(".", 1)[-1]
        _check_field(c, field)
    argv = ["clipjax", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", c, flag_values=fv, lock_config=True, sys_argv=argv)
    try:
        fv(argv)
    except (flags.Error, TypeError, ValueError) as e:
        raise ConfigError(_explain_override_error(c, str(e))) from e
    return fv.config


def _load_file(path: str, arg: str | None) -> ml_collections.ConfigDict:
    """Runs the config file's ``get_config(arg)``; its ConfigErrors are prefixed with the file."""
    import importlib.util

    if not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        near = sorted(f for f in os.listdir(folder) if f.endswith(".py")) if os.path.isdir(folder) else []
        hint = did_you_mean(os.path.basename(path), near) or (f"; {folder}/ holds {', '.join(near)}" if near else "")
        raise ConfigError(f"--config={path}: no such config file{hint}")
    module_spec = importlib.util.spec_from_file_location(f"clipjax_config_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"--config={path}: line {e.lineno}: {e.msg}; fix the file") from e
    except ImportError as e:
        raise ConfigError(f"--config={path}: {e}; fix the import or install the missing package") from e
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"--config={path}: the file defines no get_config(arg=None) function")
    try:
        c = module.get_config() if arg is None else module.get_config(arg)
    except ConfigError as e:
        raise ConfigError(f"{path}{':' + arg if arg else ''}: {e}") from e
    if not isinstance(c, ml_collections.ConfigDict):
        raise ConfigError(f"--config={path}: get_config() returned {type(c).__name__}, not a ConfigDict")
    return c


def field_paths(c: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted field name of ``c``, sections included (``optim``, ``optim.lr``, ...)."""
    out = []
    for key in c.keys():
        path = prefix + key
        out.append(path)
        value = c[key]
        if isinstance(value, ml_collections.ConfigDict):
            out += field_paths(value, path + ".")
    return out


def to_text(c: ml_collections.ConfigDict) -> str:
    """One ``a.b = value`` line per field, sorted: each line reads as a ``--config.a.b=`` override."""
    leaves = [p for p in field_paths(c) if not isinstance(_get_path(c, p), ml_collections.ConfigDict)]
    return "\n".join(f"{p} = {_get_path(c, p)!r}" for p in sorted(leaves))


def _get_path(c: ml_collections.ConfigDict, path: str) -> Any:
    for key in path.split("."):
        c = c[key]
    return c


def _check_field(c: ml_collections.ConfigDict, field: str) -> None:
    """Raises a ConfigError for an unknown ``field`` (``optim.learning_rate``), naming the closest ones."""
    paths = field_paths(c)
    if field in paths:
        return
    parent, _, leaf = field.rpartition(".")
    # The same section first (optim.learning_rate -> optim.lr), then any section (lr -> optim.lr).
    siblings = [p for p in paths if p.rpartition(".")[0] == parent]
    hits = [f"{parent}.{h}" if parent else h for h in closest(leaf, [p.rpartition(".")[2] for p in siblings])]
    if not hits:
        by_leaf: dict[str, list[str]] = {}
        for p in paths:
            by_leaf.setdefault(p.rpartition(".")[2], []).append(p)
        hits = [p for h in closest(leaf, by_leaf) for p in by_leaf[h]] + closest(field, paths)
    hint = f"did you mean {' or '.join(dict.fromkeys(hits[:3]))}?" if hits else (
        f"top-level fields: {', '.join(c.keys())} (clipjax-train --config=FILE --print_config lists all)")
    raise ConfigError(f"--config.{field}: no such config field; {hint}")


def _explain_override_error(c: ml_collections.ConfigDict, message: str) -> str:
    """One line for a rejected override value: the flag, the expected type and the current value."""
    import re

    from ml_collections.config_flags import config_path

    m = re.search(r"--config\.([\w.]+)=(.*?): ", message)
    if not m:
        return one_line(message)
    field, value = m.groups()
    current = config_path.get_value(field, c)
    kind = type(current).__name__ if current is not None else getattr(config_path.get_type(field, c), "__name__", "?")
    return f"--config.{field}={value}: expected a value of type {kind} (the config has {field}={current!r})"


def _fill(section: ml_collections.ConfigDict, defaults: dict[str, Any]) -> None:
    for key, value in defaults.items():
        if isinstance(value, dict):
            _fill(section[key], value)
        elif section[key] is None:
            section[key] = value


def _check_choice(value: Any, choices: Sequence[Any], key: str) -> None:
    if value not in choices:
        hint = did_you_mean(value, [str(c) for c in choices]) if isinstance(value, str) else ""
        raise ConfigError(f"{key}={value!r} is not one of {list(choices)}{hint}")


def default_dtype(platform: str) -> str:
    """The faster compute dtype on ``platform``: CPUs have no fast bf16 matmuls, GPUs and TPUs do."""
    return "float32" if platform == "cpu" else "bfloat16"


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None,
             platform: str | None = None) -> ml_collections.ConfigDict:
    """Derives unset values and checks consistency; returns the same (mutated) config.

    With ``num_devices`` it also resolves the mesh and checks that the global
    batch (and micro-batch) divides over the data-parallel axes. ``platform``
    (default: jax's default backend) resolves ``model.dtype="auto"``.
    """
    with c.unlocked():
        m = c.model
        from clipjax.models.sizes import SIZES

        _check_choice(m.size, list(SIZES), "model.size")
        _fill(m, {k: v for k, v in get_size(m.size).items()})
        for tower in ("image", "text", "decoder"):
            t = m[tower]
            if t.width % t.heads:
                raise ConfigError(f"model.{tower}.width={t.width} is not divisible by model.{tower}.heads={t.heads}")
        if not m.image.proj and m.embed_dim != m.image.width:
            raise ConfigError(f"model.image.proj=False needs model.embed_dim ({m.embed_dim}) equal to "
                              f"model.image.width ({m.image.width}); set one to the other")
        if m.image.image_size % m.image.patch_size:
            raise ConfigError(f"model.image.image_size={m.image.image_size} is not divisible by "
                             f"model.image.patch_size={m.image.patch_size}")
        if m.image.seq_len < 0:
            raise ConfigError(f"model.image.seq_len={m.image.seq_len} must be 0 (fixed resolution) or a NaFlex "
                              f"patch budget such as 256")
        _check_choice(m.image.pool, IMAGE_POOLS, "model.image.pool")
        _check_choice(m.image.norm, ("openai", "siglip"), "model.image.norm")
        _check_choice(m.text.pool, TEXT_POOLS, "model.text.pool")
        _check_choice(m.act, list(ACTIVATIONS), "model.act")
        _check_choice(m.remat, list(REMAT_POLICIES), "model.remat")
        if m.dtype == "auto":
            import jax

            m.dtype = default_dtype(platform or jax.default_backend())
        _check_choice(m.dtype, list(DTYPES), "model.dtype")
        _as_config_error(validate_data_config, c.data)
        c.data.buffer_size = ImageOptions.from_config(c.data, m.image.image_size).buffer_size
        vocab_size, eot_id = tokenizer_lib.describe(c.data.tokenizer)
        if m.text.eot_id is None:
            m.text.eot_id = eot_id
        if m.text.vocab_size is None:
            m.text.vocab_size = vocab_size
        elif m.text.vocab_size < vocab_size:
            raise ConfigError(f"model.text.vocab_size={m.text.vocab_size} is smaller than the "
                              f"{c.data.tokenizer!r} tokenizer's vocabulary ({vocab_size})")
        _validate_decoder(c, vocab_size)
        _check_choice(c.loss.kind, losses.KINDS, "loss.kind")
        _check_choice(c.loss.impl, losses.IMPLS, "loss.impl")
        sigmoid = c.loss.kind == "sigmoid"
        if m.init_logit_scale is None:
            m.init_logit_scale = math.log(10.0) if sigmoid else math.log(1 / 0.07)
        if m.init_logit_bias is None and sigmoid:
            m.init_logit_bias = -10.0
        if m.max_logit_scale <= 0:
            raise ConfigError(f"model.max_logit_scale={m.max_logit_scale} must be positive")

        o = c.optim
        _check_choice(o.schedule, optim.SCHEDULES, "optim.schedule")
        if o.lock_image and o.lock_text:
            raise ConfigError("optim.lock_image and optim.lock_text are both set: nothing would train")
        for key in ("lr", "eps"):
            if o[key] <= 0:
                raise ConfigError(f"optim.{key}={o[key]} must be positive")

        t = c.train
        for key in ("batch_size", "steps", "grad_accum", "log_every", "loss_spike_window"):
            if t[key] <= 0:
                raise ConfigError(f"train.{key}={t[key]} must be positive")
        if t.batch_size % t.grad_accum:
            raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
        from clipjax.stages import validate_stages

        _as_config_error(validate_stages, c)
        if t.loss_spike_factor < 0 or 0 < t.loss_spike_factor <= 1:
            raise ConfigError(f"train.loss_spike_factor={t.loss_spike_factor} must be 0 (off) or above 1")
        if t.profile_steps and not re.fullmatch(r"\d+:\d+", t.profile_steps) or \
                t.profile_steps and int(t.profile_steps.split(":")[0]) >= int(t.profile_steps.split(":")[1]):
            raise ConfigError(f"train.profile_steps={t.profile_steps!r}: give FIRST:END with FIRST < END, e.g. "
                              "'10:13' traces steps 10, 11 and 12")
        if c.checkpoint.every <= 0 or c.checkpoint.keep <= 0:
            raise ConfigError("checkpoint.every and checkpoint.keep must be positive")

        _as_config_error(sharding.rules_from_config, c.sharding.rules)
        if num_devices is not None:
            try:
                ici, dcn = sharding.resolve_mesh(c.mesh, num_devices)
            except ValueError as e:
                raise ConfigError(f"{e}{_device_count_hint(c.mesh)}") from e
            for a in sharding.MESH_AXES:
                c.mesh[a] = ici[a]
            dp = math.prod(ici[a] * dcn[a] for a in sharding.BATCH_AXES)
            if t.batch_size % (dp * t.grad_accum):
                raise ConfigError(
                    f"train.batch_size={t.batch_size} must be divisible by the data-parallel size {dp} "
                    f"(mesh data x fsdp) times train.grad_accum={t.grad_accum}")
        _as_config_error(validate_evals_config, c.evals)
    return c


def _validate_decoder(c: ml_collections.ConfigDict, text_vocab: int) -> None:
    """Derives the decoder's length and vocabulary; checks the loss.decoder fields."""
    from clipjax.data.locca import NUM_SPECIAL

    md, d = c.model.decoder, c.loss.decoder
    if md.max_length is None:
        md.max_length = c.model.text.context_length
    if d.num_bins < 2:
        raise ConfigError(f"loss.decoder.num_bins={d.num_bins} must be at least 2")
    md.vocab_size = text_vocab + d.num_bins + NUM_SPECIAL
    mix = (d.mix_cap, d.mix_aref, d.mix_gcap)
    if min(mix) < 0 or sum(mix) <= 0:
        raise ConfigError(f"loss.decoder.mix_cap/mix_aref/mix_gcap={mix} must be >= 0 with a positive sum")
    if not 0.0 <= d.parallel_fraction <= 1.0 or not 0.0 < d.min_visible <= 1.0:
        raise ConfigError(f"loss.decoder.parallel_fraction={d.parallel_fraction} must be in [0, 1] and "
                          f"loss.decoder.min_visible={d.min_visible} in (0, 1]")
    if d.vocab_chunk < 1 or md.max_length < 6:
        raise ConfigError(f"loss.decoder.vocab_chunk={d.vocab_chunk} must be positive and model.decoder.max_length="
                          f"{md.max_length} at least 6 (a task id, a short text and four coordinates)")


def _as_config_error(check: Callable[[Any], None], section: Any) -> None:
    """Runs a section's validator; its ValueErrors (bad values by contract) become ConfigErrors."""
    try:
        check(section)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _device_count_hint(mesh: ml_collections.ConfigDict) -> str:
    """How to get the devices the mesh asks for (on CPU: simulate them), or to fit the mesh to them."""
    import jax

    sizes = sharding.mesh_axis_sizes(mesh)
    if sum(s < 0 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
        return ""  # the sizes themselves are wrong, whatever the devices
    fixed = math.prod(s for s in sizes if s > 0)
    want = f"{fixed}" if all(s > 0 for s in sizes) else f"a multiple of {fixed}"
    if jax.default_backend() == "cpu":
        n = fixed if fixed > 1 else 8
        return (f"; the mesh needs {want} devices: on CPU simulate them with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={n} (or set --config.mesh.* to fit)")
    return f"; the mesh needs {want} devices: set --config.mesh.* to fit the devices (one axis may be -1)"
