"""transformers ``CLIPModel``, ``SiglipModel`` and ``Siglip2Model`` weights in and out of clipjax (numpy; no torch).

``Siglip2Model`` is SigLIP with NaFlex input: a clipjax SigLIP model with ``model.image.seq_len`` > 0
exports as one (its patch embedding a Linear over flattened patches), and imports with ``seq_len`` set to
the position grid's size, the processor's default budget.

``import_weights(source)`` reads a ``save_pretrained`` directory (``config.json`` and
``model.safetensors``, or a sharded ``model.safetensors.index.json``), or a
``model.safetensors`` with its ``config.json`` beside it, and returns ``(config.model, params)``;
``export_weights(params, model_config, out_dir)`` writes a directory that
``transformers.AutoModel.from_pretrained(out_dir)`` loads with no missing or unexpected keys.
Tensor shapes give every width, depth, size and length; ``config.json`` gives the head counts,
activation, LayerNorm eps and end token (transformers' defaults where it omits them). The
conversion only transposes and reshapes: round trips are bit-exact. Key tables: docs/interop.md.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping

import ml_collections
import numpy as np

from clipjax.interop import blocks
from clipjax.interop.blocks import WeightsError

# clipjax activation <-> transformers' hidden_act ("gelu_new" is the same tanh approximation).
ACTS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}
_ACTS_IN = {**{v: k for k, v in ACTS.items()}, "gelu_new": "gelu_tanh"}
# What config.json may omit (transformers writes only values that differ from its defaults).
_DEFAULTS = {
    "clip": {"vision": {"num_attention_heads": 12, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
             "text": {"num_attention_heads": 8, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                      "eos_token_id": 49407, "pad_token_id": 1}},
    "siglip": {"vision": {"num_attention_heads": 12, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
                          "vision_use_head": True},
               "text": {"num_attention_heads": 12, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
                        "eos_token_id": 1, "pad_token_id": 1}},
}
_DEFAULTS["siglip2"] = _DEFAULTS["siglip"]
_SIGLIPS = ("siglip", "siglip2")
_BLOCK = blocks.TorchBlock(ln_attn="layer_norm1", attn="self_attn.", fused=False, ln_mlp="layer_norm2",
                           fc="mlp.fc1", proj="mlp.fc2")
_LAYERS = {"image": "vision_model.encoder.layers.", "text": "text_model.encoder.layers."}
# One-to-one tensors: (transformers key, clipjax key, how): "=" as is, "T" transposed, "conv" a
# Conv2d [D, C, p, p] <-> patch kernel [(p p C), D], "1" a [1] or [] scalar <-> [].
_COMMON = (
    ("vision_model.embeddings.patch_embedding.weight", "image/patch_kernel", "conv"),
    ("vision_model.embeddings.position_embedding.weight", "image/pos_embedding", "="),
    ("vision_model.post_layernorm.weight", "image/ln_post/scale", "="),
    ("vision_model.post_layernorm.bias", "image/ln_post/bias", "="),
    ("text_model.embeddings.token_embedding.weight", "text/token_embedding", "="),
    ("text_model.embeddings.position_embedding.weight", "text/pos_embedding", "="),
    ("text_model.final_layer_norm.weight", "text/ln_final/scale", "="),
    ("text_model.final_layer_norm.bias", "text/ln_final/bias", "="),
    ("logit_scale", "logit_scale", "1"),
)
TABLES = {
    "clip": _COMMON + (
        ("vision_model.embeddings.class_embedding", "image/class_token", "="),
        ("vision_model.pre_layrnorm.weight", "image/ln_pre/scale", "="),  # sic: transformers' spelling
        ("vision_model.pre_layrnorm.bias", "image/ln_pre/bias", "="),
        ("visual_projection.weight", "image/proj", "T"),
        ("text_projection.weight", "text/proj", "T"),
    ),
    "siglip": _COMMON + (
        ("vision_model.embeddings.patch_embedding.bias", "image/patch_bias", "="),
        ("vision_model.head.probe", "image/map_head/probe", "="),
        ("vision_model.head.layernorm.weight", "image/map_head/ln/scale", "="),
        ("vision_model.head.layernorm.bias", "image/map_head/ln/bias", "="),
        ("text_model.head.weight", "text/proj", "T"),
        ("text_model.head.bias", "text/proj_bias", "="),
        ("logit_bias", "logit_bias", "1"),
    ),
}
# Siglip2Model: SiglipModel's tensors, the patch embedding a Linear over flattened (py, px, c) patches.
_PATCH = "vision_model.embeddings.patch_embedding.weight"
TABLES["siglip2"] = tuple((k, ours, "T" if k == _PATCH else how) for k, ours, how in TABLES["siglip"])
ARCHITECTURES = {"clip": "CLIPModel", "siglip": "SiglipModel", "siglip2": "Siglip2Model"}


# --------------------------------------------------------------------------- files


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: cannot read it as JSON: {e}") from e


def read_files(source: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(config.json, state_dict)`` of a ``save_pretrained`` directory or a ``.safetensors`` file."""
    from clipjax.interop.openclip import read_state_dict

    source = os.fspath(source)
    folder = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise WeightsError(f"{source}: no config.json beside the weights (a transformers save_pretrained "
                           "directory holds config.json and model.safetensors)")
    config = _read_json(config_path)
    if not os.path.isdir(source):
        files = [source]
    elif os.path.isfile(index := os.path.join(folder, "model.safetensors.index.json")):
        files = [os.path.join(folder, f) for f in sorted(set(_read_json(index)["weight_map"].values()))]
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = [os.path.join(folder, "model.safetensors")]
    else:
        raise WeightsError(f"{source}: no model.safetensors (pytorch_model.bin is pickled and never read; "
                           "convert it to safetensors first)")
    sd: dict[str, np.ndarray] = {}
    for f in files:
        if not f.endswith(".safetensors"):
            raise WeightsError(f"{f}: only .safetensors weights are read (pickled files never are)")
        sd.update(read_state_dict(f)[0])
    return config, sd


# --------------------------------------------------------------------------- config


def _model_type(config: Mapping[str, Any]) -> str:
    kind = config.get("model_type")
    if kind not in ARCHITECTURES:
        raise WeightsError(f"config.json model_type={kind!r}: clipjax reads {sorted(ARCHITECTURES)}")
    return kind


def _tower_config(config: Mapping[str, Any], kind: str, tower: str) -> dict[str, Any]:
    return {**_DEFAULTS[kind][tower], **(config.get(f"{tower}_config") or {})}


def _act(v: Mapping[str, Any], t: Mapping[str, Any]) -> str:
    acts = {v["hidden_act"], t["hidden_act"]}
    if len(acts) > 1 or not acts <= set(_ACTS_IN):
        raise WeightsError(f"hidden_act {sorted(acts)}: clipjax needs one activation for both towers, one of "
                           f"{sorted(_ACTS_IN)}")
    return _ACTS_IN[acts.pop()]


def model_config_from_hf(config: Mapping[str, Any], sd: Mapping[str, np.ndarray], *,
                         scan: bool = True) -> ml_collections.ConfigDict:
    """clipjax's ``config.model`` for a transformers ``config.json`` and its state_dict."""
    from clipjax.config import base_config
    from clipjax.interop.openclip import _matching_row

    kind = _model_type(config)
    v, t = _tower_config(config, kind, "vision"), _tower_config(config, kind, "text")
    if not v.get("vision_use_head", True):
        raise WeightsError("vision_use_head=False: a SigLIP image tower without its MAP head has no embedding")
    eps = {float(v["layer_norm_eps"]), float(t["layer_norm_eps"])}
    if len(eps) > 1:
        raise WeightsError(f"layer_norm_eps differs between the towers ({sorted(eps)}); clipjax has one model.ln_eps")
    need = [k for k, _, _ in TABLES[kind] if k != "logit_bias"] + [
        _LAYERS["image"] + "0.mlp.fc1.weight", _LAYERS["text"] + "0.mlp.fc1.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise WeightsError(f"not a transformers {ARCHITECTURES[kind]} state_dict: missing {missing[:6]}")
    m = base_config().model
    conv = sd[_PATCH]  # [D, C, p, p]; Siglip2's Linear [D, p p C]
    rows = int(sd["vision_model.embeddings.position_embedding.weight"].shape[0])
    patch = int(conv.shape[2]) if conv.ndim == 4 else math.isqrt(int(conv.shape[1]) // 3)
    grid = math.isqrt(rows - (kind == "clip"))
    vocab, text_width = sd["text_model.embeddings.token_embedding.weight"].shape
    depth = {tower: len({int(mt.group(1)) for k in sd if (mt := re.match(re.escape(pre) + r"(\d+)\.", k))})
             for tower, pre in _LAYERS.items()}
    siglip = kind in _SIGLIPS
    m.embed_dim = int((sd["text_model.head.weight"] if siglip else sd["text_projection.weight"]).shape[0])
    m.image.update(width=int(conv.shape[0]), depth=depth["image"], heads=int(v["num_attention_heads"]),
                   mlp_dim=int(sd[_LAYERS["image"] + "0.mlp.fc1.weight"].shape[0]), patch_size=patch,
                   image_size=grid * patch, pool="map" if siglip else "tok", class_token=not siglip,
                   ln_pre=not siglip, patch_bias=siglip, proj=not siglip, norm="siglip" if siglip else "openai",
                   seq_len=rows if kind == "siglip2" else 0)
    m.text.update(width=int(text_width), depth=depth["text"], heads=int(t["num_attention_heads"]),
                  mlp_dim=int(sd[_LAYERS["text"] + "0.mlp.fc1.weight"].shape[0]), vocab_size=int(vocab),
                  context_length=int(sd["text_model.embeddings.position_embedding.weight"].shape[0]),
                  pad_id=int(t.get("pad_token_id") or 0), proj_bias=siglip)
    if siglip:  # pads attended to, pooled at the final position, as trained
        m.text.update(pool="final", causal=False, pad_mask=False, eot_id=int(t["eos_token_id"]))
    else:  # transformers' CLIP pools at argmax(ids) when eos_token_id is the legacy 2, else at the first eos
        eos = int(t["eos_token_id"])
        m.text.update(pool="eot", causal=True, eot_id=None if eos == 2 else eos)
    m.act = _act(v, t)
    m.ln_eps = eps.pop()
    m.dtype, m.scan = "float32", bool(scan)
    m.init_logit_scale = math.log(10.0) if siglip else math.log(1 / 0.07)
    m.init_logit_bias = -10.0 if siglip else None
    m.size = _matching_row(m) or "tiny"  # every tower field is explicit; size only names a matching row
    return m


def _kind(m: ml_collections.ConfigDict) -> str:
    """'siglip', 'siglip2' (NaFlex) or 'clip': the transformers class that expresses ``m`` (WeightsError
    naming what does not fit)."""
    i, t = m.image, m.text
    siglip = dict(class_token=False, ln_pre=False, patch_bias=True, pool="map", proj=False)
    siglip_text = dict(causal=False, pad_mask=False, pool="final", proj_bias=True)
    clip = dict(class_token=True, ln_pre=True, patch_bias=False, pool="tok", proj=True)
    clip_text = dict(causal=True, pool="eot", proj_bias=False)
    kind = "siglip" if m.init_logit_bias is not None else "clip"
    want, want_text = (siglip, siglip_text) if kind == "siglip" else (clip, clip_text)
    bad = [f"model.image.{k}={i.get(k)!r}" for k, val in want.items() if i.get(k) != val]
    bad += [f"model.text.{k}={t.get(k)!r}" for k, val in want_text.items() if t.get(k) != val]
    if m.act not in ACTS:
        bad.append(f"model.act={m.act!r}")
    if kind == "clip" and t.get("eot_id") == 2:
        bad.append("model.text.eot_id=2 (transformers' CLIP reads eos_token_id 2 as 'pool at argmax(ids)')")
    if bad:
        spelled = ", ".join(f"{k}={v!r}" for k, v in {**want, **{f'text.{k}': v for k, v in want_text.items()}}.items())
        raise WeightsError(f"cannot export to transformers' {ARCHITECTURES[kind]} (the model "
                           f"{'has' if kind == 'siglip' else 'has no'} logit bias): {'; '.join(bad)}; "
                           f"it needs {spelled}")
    if kind == "siglip" and i.get("seq_len", 0) > 0:
        return "siglip2"
    return kind


def hf_config(m: ml_collections.ConfigDict, *, pad_id: int | None = None) -> dict[str, Any]:
    """The ``config.json`` of model ``m`` (every field written, so no transformers default is relied on)."""
    kind = _kind(m)
    i, t = m.image, m.text
    act = ACTS[m.act]
    vision = {"hidden_size": int(i.width), "intermediate_size": int(i.mlp_dim), "num_hidden_layers": int(i.depth),
              "num_attention_heads": int(i.heads), "num_channels": 3, "image_size": int(i.image_size),
              "patch_size": int(i.patch_size), "hidden_act": act, "layer_norm_eps": float(m.ln_eps),
              "attention_dropout": 0.0}
    eot = t.get("eot_id")
    text = {"vocab_size": int(t.vocab_size), "hidden_size": int(t.width), "intermediate_size": int(t.mlp_dim),
            "num_hidden_layers": int(t.depth), "num_attention_heads": int(t.heads),
            "max_position_embeddings": int(t.context_length), "hidden_act": act, "layer_norm_eps": float(m.ln_eps),
            "attention_dropout": 0.0, "pad_token_id": int(t.pad_id if pad_id is None else pad_id),
            "eos_token_id": int(2 if eot is None else eot)}
    cfg: dict[str, Any] = {"architectures": [ARCHITECTURES[kind]], "model_type": kind, "dtype": "float32"}
    if kind in _SIGLIPS:
        vision["model_type"], text["model_type"] = f"{kind}_vision_model", f"{kind}_text_model"
        text["projection_size"] = int(m.embed_dim)
    if kind == "siglip2":  # no image size: the position grid's cells and the patch size say it all
        vision["num_patches"] = (int(i.image_size) // int(i.patch_size)) ** 2
        del vision["image_size"]
    else:
        vision["model_type"], text["model_type"] = "clip_vision_model", "clip_text_model"
        vision["projection_dim"] = text["projection_dim"] = int(m.embed_dim)
        cfg["projection_dim"] = int(m.embed_dim)
        cfg["logit_scale_init_value"] = float(math.log(1 / 0.07))
    cfg.update(text_config=text, vision_config=vision)
    return cfg


def expected_shapes(m: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """Every transformers state_dict key of model ``m`` with its shape (mapped from zero-stride stand-ins,
    so nothing of the model's size is allocated)."""
    import jax
    from flax import linen as nn

    from clipjax.models import build_model, dummy_inputs

    m = ml_collections.ConfigDict(m.to_dict())
    m.scan = False
    shapes = jax.eval_shape(lambda: build_model(m).init(jax.random.key(0), *dummy_inputs(m)))["params"]
    zeros = jax.tree.map(lambda a: np.broadcast_to(np.float32(0), a.shape), nn.unbox(shapes))
    return {k: tuple(v.shape) for k, v in state_dict_from_params(zeros, m, check=False).items()}


# --------------------------------------------------------------------------- the mapping


def _convert_in(value: np.ndarray, how: str) -> np.ndarray:
    if how == "T":
        return value.T
    if how == "conv":  # [D, C, py, px] -> [(py px C), D]: clipjax flattens patches as (py, px, c)
        return value.transpose(2, 3, 1, 0).reshape(-1, value.shape[0])
    return value.reshape(()) if how == "1" else value


def _convert_out(value: np.ndarray, how: str, m: ml_collections.ConfigDict, key: str) -> np.ndarray:
    if how == "T":
        return value.T
    if how == "conv":
        p = m.image.patch_size
        return value.reshape(p, p, 3, -1).transpose(3, 2, 0, 1)
    if how == "1":  # SiglipModel's scale and bias are [1]; CLIPModel's logit_scale is []
        return value.reshape((1,) if key.startswith("logit") and m.init_logit_bias is not None else ())
    return value


def params_from_state_dict(sd: Mapping[str, np.ndarray], m: ml_collections.ConfigDict) -> dict[str, Any]:
    """clipjax params (nested dicts of float32 numpy) of model ``m`` from a transformers state_dict."""
    from flax import traverse_util

    kind = _kind(m)
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}  # buffers older files saved
    blocks.check_keys(sd, expected_shapes(m), f"state_dict does not match a transformers {ARCHITECTURES[kind]}",
                      WeightsError)
    flat = {ours: _convert_in(sd[theirs], how) for theirs, ours, how in TABLES[kind]}
    for tower, prefix in _LAYERS.items():
        tm = m[tower]
        layers = [blocks.block_from_torch(sd, f"{prefix}{n}.", _BLOCK, tm.heads) for n in range(tm.depth)]
        flat.update(blocks.prefixed(f"{tower}/transformer/", blocks.stack(layers, m.scan)))
    if kind in _SIGLIPS:
        head = "vision_model.head."
        flat.update(blocks.prefixed("image/map_head/attn/",
                                    blocks.attention_from_torch(sd, head + "attention.", True, m.image.heads)))
        flat.update(blocks.prefixed("image/map_head/mlp/", blocks.mlp_from_torch(sd, head + "mlp.fc1", head + "mlp.fc2")))
    flat = {k: np.asarray(v, dtype=np.float32, order="C") for k, v in flat.items()}
    return traverse_util.unflatten_dict(flat, sep="/")


def state_dict_from_params(params: Any, m: ml_collections.ConfigDict, *, check: bool = True) -> dict[str, np.ndarray]:
    """The transformers state_dict (float32 numpy) of clipjax ``params`` of model ``m``."""
    from flax import linen as nn
    from flax import traverse_util

    kind = _kind(m)
    flat = {k: np.asarray(v, dtype=np.float32) for k, v in traverse_util.flatten_dict(nn.unbox(params), sep="/").items()}
    sd = {theirs: _convert_out(flat[ours], how, m, theirs) for theirs, ours, how in TABLES[kind]}
    for tower, prefix in _LAYERS.items():
        for n, block in enumerate(blocks.unstack(blocks.sub(flat, f"{tower}/transformer/"), m[tower].depth, m.scan)):
            sd.update(blocks.block_to_torch(block, f"{prefix}{n}.", _BLOCK))
    if kind in _SIGLIPS:
        head = "vision_model.head."
        sd.update(blocks.attention_to_torch(blocks.sub(flat, "image/map_head/attn/"), head + "attention.", True))
        sd.update(blocks.mlp_to_torch(blocks.sub(flat, "image/map_head/mlp/"), head + "mlp.fc1", head + "mlp.fc2"))
    if check:
        sd = {k: np.asarray(v, order="C") for k, v in sd.items()}
        blocks.check_keys(sd, expected_shapes(m), "params do not match the model config", WeightsError)
    return sd


# --------------------------------------------------------------------------- public API


def import_weights(source: str, *, scan: bool = True) -> tuple[ml_collections.ConfigDict, dict]:
    """``(config.model, params)`` from a transformers directory or ``model.safetensors`` (+ ``config.json``)."""
    config, sd = read_files(source)
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    m = model_config_from_hf(config, sd, scan=scan)
    return m, params_from_state_dict(sd, m)


def preprocessor_config(m: ml_collections.ConfigDict, kind: str) -> dict[str, Any]:
    """``preprocessor_config.json`` whose processor gives clipjax's eval pixels: resize the shorter
    side (bicubic), centre crop, normalise with the statistics the model was trained with."""
    from clipjax.data import resize

    size = int(m.image.image_size)
    mean, std = resize.NORMS[m.image.get("norm", "openai")]
    if kind == "siglip2":  # NaFlex: the whole image at its aspect ratio, at most seq_len patches
        return {"image_processor_type": "Siglip2ImageProcessor", "processor_class": "Siglip2Processor",
                "do_resize": True, "resample": 3, "patch_size": int(m.image.patch_size),
                "max_num_patches": int(m.image.seq_len), "do_rescale": True, "rescale_factor": 1 / 255,
                "do_normalize": True, "image_mean": list(mean), "image_std": list(std), "do_convert_rgb": True}
    return {"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor" if kind == "clip"
            else "SiglipProcessor", "do_resize": True, "size": {"shortest_edge": size}, "resample": 3,
            "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean), "image_std": list(std),
            "do_convert_rgb": True}


def export_weights(params: Any, model_config: ml_collections.ConfigDict, out_dir: str, *,
                   tokenizer: str | None = None) -> str:
    """Writes ``out_dir/{config.json, model.safetensors, preprocessor_config.json}`` and, given the run's
    ``data.tokenizer`` spec, its tokenizer files; returns the transformers class name."""
    from clipjax.data import tokenizer as tokenizer_lib
    from clipjax.interop.openclip import write_state_dict

    kind = _kind(model_config)
    os.makedirs(out_dir, exist_ok=True)
    pad_id = None
    if tokenizer:
        pad_id = tokenizer_lib.save_hf_files(tokenizer, out_dir, context_length=int(model_config.text.context_length),
                                             processor={"clip": "CLIPProcessor", "siglip": "SiglipProcessor",
                                                                        "siglip2": "Siglip2Processor"}[kind])
    write_state_dict(state_dict_from_params(params, model_config), os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(model_config, pad_id=pad_id), f, indent=2)
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor_config(model_config, kind), f, indent=2)
    return ARCHITECTURES[kind]
