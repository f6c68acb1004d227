"""``clipjax-convert``: OpenCLIP/OpenAI weights to a clipjax checkpoint and back.

  clipjax-convert from-openclip --checkpoint=FILE [--model=NAME|CONFIG.json] --workdir=DIR
  clipjax-convert to-openclip --workdir=DIR [--step=N] --out=FILE.safetensors
  clipjax-convert from-hf --checkpoint=HF_DIR --workdir=DIR      (CLIPModel, SiglipModel)
  clipjax-convert to-hf --workdir=DIR [--step=N] --out=HF_DIR
  clipjax-convert from-bigvision --checkpoint=FILE.npz --workdir=DIR
  clipjax-convert to-bigvision --workdir=DIR [--step=N] --out=FILE.npz [--scanned]

from-openclip writes DIR/checkpoints/0 (params and the config describing them), which
clipjax-eval and --config.checkpoint.init_from=DIR read, and prints the config
overrides that describe the model. to-openclip writes the state_dict and, beside it,
open_clip_config.json, so open_clip.create_model("local-dir:FOLDER") loads any export.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from clipjax.errors import ArgumentParser, UserError, run_cli

# Besides model.*, the fields a converted model's config sets.
RUN_KEYS = ("data.tokenizer", "loss.kind", "data.eval_crop")
# Not part of what the weights describe: compute settings and initial values.
_SKIP = ("model.dtype", "model.remat", "model.init_logit_scale", "model.init_logit_bias")


def _flat(d: Any, prefix: str) -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}"))
        return out
    return {prefix: d}


def run_config(model_config) -> Any:
    """A validated ``base_config()`` running ``model_config``: CLIP's tokenizer for CLIP's vocabulary,
    the sigmoid loss when the model has a logit bias, OpenCLIP's eval crop."""
    from clipjax import config as config_lib

    c = config_lib.base_config()
    c.model = model_config
    c.data.tokenizer = "clip" if model_config.text.vocab_size == 49408 else "bytes"
    c.loss.kind = "sigmoid" if model_config.init_logit_bias is not None else "softmax"
    if "eval_crop" in c.data:
        c.data.eval_crop = "openclip"
    return config_lib.validate(c)


def overrides(config) -> list[str]:
    """``--config.KEY=VALUE`` flags turning ``base_config()`` into ``config``'s model and run keys."""
    from clipjax import config as config_lib

    ref = config_lib.base_config()
    flags = [f"--config.model.size={config.model.size}"]
    for key in RUN_KEYS:
        section, name = key.split(".")
        if name in config[section] and config[section][name] != ref[section][name]:
            flags.append(f"--config.{key}={config[section][name]}")
            ref[section][name] = config[section][name]
    ref.model.size = config.model.size
    config_lib.validate(ref)
    mine, base = _flat(config.model.to_dict(), "model"), _flat(ref.model.to_dict(), "model")
    flags += [f"--config.{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in mine.items()
              if k not in _SKIP and k != "model.size" and v != base.get(k)]
    return flags


def from_openclip(checkpoint: str, model: str | None, workdir: str, fmt: str = "openclip") -> str:
    """Converts ``checkpoint`` (``fmt``: openclip, hf or bigvision) into ``workdir/checkpoints/0``;
    returns the summary printed by the CLI."""
    import jax

    from clipjax import checkpoint as ckpt_lib
    from clipjax.interop import bigvision, hf, openclip
    from clipjax.models import count_params

    if fmt == "hf":
        model_config, params = hf.import_weights(checkpoint)
    elif fmt == "bigvision":
        model_config, params = bigvision.import_weights(checkpoint)
    else:
        model_config, params = openclip.import_weights(checkpoint, model)
    config = run_config(model_config)
    ckpt_lib.check_workdir_writable(workdir)
    checkpointer = ckpt_lib.Checkpointer(workdir, every=1, keep=1, async_save=False, config_json=config.to_json())
    if checkpointer.latest_step() is not None:
        raise UserError(f"--workdir={workdir} already holds checkpoints; choose an empty folder")
    checkpointer.save(0, {"params": jax.tree.map(jax.numpy.asarray, params)})
    checkpointer.close()
    flags = " ".join(overrides(config))
    name = openclip.openclip_name(model_config) if fmt == "openclip" else None
    return (f"wrote {ckpt_lib.checkpoint_dir(workdir)}/0: {name or 'custom model'}, "
            f"{count_params(params):,} parameters\n"
            f"config overrides: {flags}\n"
            f"evaluate:  clipjax-eval --config=CONFIG --workdir={workdir} {flags}\n"
            f"fine-tune: clipjax-train --config=CONFIG --workdir=NEW_DIR --config.checkpoint.init_from={workdir} "
            f"{flags}")


def _saved_model(workdir: str, step: int | None):
    """``(model config, params on one device, step)`` of a checkpoint in ``workdir``."""
    import jax
    import ml_collections
    from flax import linen as nn

    from clipjax import checkpoint as ckpt_lib
    from clipjax.models import build_model, dummy_inputs

    checkpointer = ckpt_lib.Checkpointer(workdir, every=1, keep=1, async_save=False)
    try:
        step = checkpointer.latest_step() if step is None else int(step)
        saved = None if step is None else checkpointer.saved_config(step)
    finally:
        checkpointer.close()
    step_dir = os.path.join(ckpt_lib.checkpoint_dir(workdir), str(step))
    if step is None or not os.path.isdir(step_dir):
        raise UserError(f"--workdir={workdir}: no checkpoint" + (f" at step {step}" if step is not None else ""))
    if saved is None:
        raise UserError(f"{step_dir} holds no config, so its model is unknown")
    model_config = ml_collections.ConfigDict(json.loads(saved)["model"])
    model = build_model(model_config)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(model_config)))["params"]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), nn.unbox(boxed))
    return model_config, jax.device_get(ckpt_lib.load_params(step_dir, abstract)), step


def to_hf(workdir: str, step: int | None, out: str) -> str:
    """Exports ``workdir``'s checkpoint to the transformers directory ``out``; returns the summary."""
    from clipjax import checkpoint as ckpt_lib
    from clipjax.interop import hf

    model_config, params, step = _saved_model(workdir, step)
    checkpointer = ckpt_lib.Checkpointer(workdir, every=1, keep=1, async_save=False)
    try:
        tokenizer = json.loads(checkpointer.saved_config(step))["data"]["tokenizer"]
    finally:
        checkpointer.close()
    cls = hf.export_weights(params, model_config, out, tokenizer=tokenizer)
    return f'wrote {out} (step {step}): transformers.{cls}.from_pretrained("{out}")'


def to_bigvision(workdir: str, step: int | None, out: str, scanned: bool) -> str:
    """Exports ``workdir``'s checkpoint to the big_vision ``.npz`` ``out``; returns the summary."""
    from clipjax.interop import bigvision

    model_config, params, step = _saved_model(workdir, step)
    bigvision.export_weights(params, model_config, out, scanned=scanned)
    return f"wrote {out} (step {step}, {'scanned' if scanned else 'per-layer'} blocks)"


def to_openclip(workdir: str, step: int | None, out: str) -> str:
    """Exports ``workdir``'s checkpoint to ``out`` plus ``open_clip_config.json``; returns the summary."""
    from clipjax.data import resize
    from clipjax.interop import openclip

    model_config, params, step = _saved_model(workdir, step)
    model_cfg = openclip.export_weights(params, model_config, out)
    folder = os.path.dirname(os.path.abspath(out))
    preprocess = {"size": int(model_config.image.image_size), "mode": "RGB", "mean": list(resize.OPENAI_MEAN),
                  "std": list(resize.OPENAI_STD), "interpolation": "bicubic", "resize_mode": "shortest"}
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, f, indent=2)
    name = openclip.openclip_name(model_config)
    lines = [f"wrote {out} (step {step}) and {folder}/open_clip_config.json",
             f'open_clip.create_model("local-dir:{folder}")']
    if name:
        lines.append(f'open_clip.create_model("{name}", pretrained="{os.path.abspath(out)}")')
    return "\n".join(lines)


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="clipjax-convert", doc=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("from-openclip", help="OpenCLIP/OpenAI weights file -> clipjax checkpoint")
    f.add_argument("--checkpoint", required=True, help=".safetensors, or .bin/.pt/OpenAI TorchScript with torch")
    f.add_argument("--model", default=None,
                   help="OpenCLIP model name (ViT-B-32, ViT-B-32-quickgelu, ...) or model config JSON: "
                        "what tensor shapes cannot tell (heads, activation, pooling)")
    f.add_argument("--workdir", required=True, help="empty folder for the clipjax checkpoint")
    t = sub.add_parser("to-openclip", help="clipjax checkpoint -> OpenCLIP state_dict")
    t.add_argument("--workdir", required=True, help="run folder holding checkpoints/")
    t.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    t.add_argument("--out", required=True, help="FILE.safetensors (or .bin/.pt with torch)")
    for fmt, what in (("hf", "transformers save_pretrained directory (config.json + model.safetensors)"),
                      ("bigvision", "big_vision SigLIP .npz")):
        f = sub.add_parser(f"from-{fmt}", help=f"{what} -> clipjax checkpoint")
        f.add_argument("--checkpoint", required=True, help=what)
        f.add_argument("--workdir", required=True, help="empty folder for the clipjax checkpoint")
        t = sub.add_parser(f"to-{fmt}", help=f"clipjax checkpoint -> {what}")
        t.add_argument("--workdir", required=True, help="run folder holding checkpoints/")
        t.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
        t.add_argument("--out", required=True, help="output folder" if fmt == "hf" else "FILE.npz")
        if fmt == "bigvision":
            t.add_argument("--scanned", action="store_true", help="stacked encoderblock (default: encoderblock_N)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 with one line on stderr for a user error)."""
    return run_cli("clipjax-convert", _main, argv)


def _main(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    try:
        if a.command.startswith("from-"):
            print(from_openclip(a.checkpoint, getattr(a, "model", None), a.workdir, a.command[len("from-"):]))
        elif a.command == "to-hf":
            print(to_hf(a.workdir, a.step, a.out))
        elif a.command == "to-bigvision":
            print(to_bigvision(a.workdir, a.step, a.out, a.scanned))
        else:
            print(to_openclip(a.workdir, a.step, a.out))
    except FileNotFoundError as e:
        raise UserError(str(e)) from e
    return 0


if __name__ == "__main__":
    sys.exit(main())
