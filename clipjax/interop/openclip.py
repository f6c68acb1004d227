"""OpenCLIP and OpenAI CLIP weights in and out of clipjax (pure numpy on the conversion path).

``import_weights(source, model=None)`` turns an OpenCLIP/OpenAI ViT CLIP state_dict
(a ``.safetensors`` file, a ``.bin``/``.pt`` file or OpenAI TorchScript archive when
torch is installed, or an in-memory ``dict``) into ``(config.model, params)`` for
``clipjax.models.build_model``; ``export_weights(params, model_config, path)`` writes
the state_dict back, loadable by ``open_clip.create_model(name, pretrained=path)``
with ``strict=True``. The conversion only transposes and reshapes, so a round trip
is bit-exact. The key mapping is in docs/interop.md.

Tensor shapes give every width, depth, patch size, image size, context length,
vocabulary and embedding size. They cannot tell the head counts, the activation
or the pooling: those come from ``model``, an OpenCLIP model name (``"ViT-B-32"``,
``"ViT-B-32-quickgelu"``: the suffix selects QuickGELU), an OpenCLIP model config
(the ``model_cfg`` dict of its JSON files, or the path of such a JSON file), or,
without it, from OpenCLIP's conventions: heads from the size table row with the
same shapes (else width / 64), GELU (QuickGELU for OpenAI TorchScript archives),
class-token image pooling and end-of-text (argmax) text pooling.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import zipfile
from typing import Any, Mapping

import ml_collections
import numpy as np

from clipjax.interop import blocks
from clipjax.interop.blocks import WeightsError

log = logging.getLogger("clipjax")

# OpenCLIP model names whose towers are rows of clipjax's size table (clipjax.models.sizes).
OPENCLIP_NAMES: dict[str, str] = {
    "ViT-S-32": "S/32", "ViT-S-16": "S/16", "ViT-B-32": "B/32", "ViT-B-16": "B/16",
    "ViT-L-14": "L/14", "ViT-H-14": "H/14", "ViT-g-14": "g/14",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
# Entries of OpenAI's TorchScript state_dicts that are not weights.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
# Key fragments of OpenCLIP architectures clipjax does not have, with the reason.
_UNSUPPORTED = (
    ("visual.trunk.", "timm image towers (e.g. OpenCLIP's ViT-*-SigLIP models)"),
    ("visual.layer1.", "ResNet image towers (ModifiedResNet)"),
    ("text.transformer.embeddings.", "Hugging Face text towers"),
    ("visual.attn_pool.", "attentional-pooler image towers (CoCa)"),
    ("text_decoder.", "CoCa text decoders"),
    (".ls_1.", "layer scale (ls_init_value)"),
    ("text_projection.weight", "a text projection with a bias or an MLP (text_cfg.proj_type/proj_bias)"),
)


# --------------------------------------------------------------------------- files


def _is_torchscript(path: str) -> bool:
    """OpenAI's released checkpoints are TorchScript archives: zips holding compiled code."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _torch_to_numpy(value: Any) -> np.ndarray:
    import torch

    if not isinstance(value, torch.Tensor):
        raise WeightsError(f"state_dict entry of type {type(value).__name__} is not a tensor")
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value).numpy()


def _unwrap(obj: Any, path: str) -> Mapping[str, Any]:
    """The state_dict inside OpenCLIP training checkpoints ({"state_dict": ...}) or {"model": ...} wrappers."""
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state_dict")
    return obj


def _read_torch(path: str) -> tuple[dict[str, np.ndarray], bool]:
    try:
        import torch
    except ImportError:
        raise WeightsError(f"{path}: reading {os.path.splitext(path)[1]} files needs PyTorch; "
                           "pip install 'clipjax[torch]', or convert the file to .safetensors") from None
    try:
        if _is_torchscript(path):
            # TorchScript archives are loaded by the TorchScript runtime, not unpickled as Python objects.
            sd = torch.jit.load(path, map_location="cpu").state_dict()
            return {k: _torch_to_numpy(v) for k, v in sd.items()}, True
        obj = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise WeightsError(f"{path}: not a readable PyTorch weights file (truncated or another format?): "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    except Exception as e:  # noqa: BLE001 - pickle errors from weights_only refusing an object
        raise WeightsError(f"{path}: refused to load (it holds Python objects beyond tensors, or is corrupt): "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return {k: _torch_to_numpy(v) for k, v in _unwrap(obj, path).items()}, False


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise WeightsError(f"{path}: not a readable .safetensors file (truncated or another format?): {e}") from e


def read_state_dict(path: str) -> tuple[dict[str, np.ndarray], bool]:
    """``(state_dict as numpy arrays, is_openai_torchscript)`` from a weights file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path!r} does not exist")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        return _read_safetensors(path), False
    if suffix in _TORCH_SUFFIXES:
        return _read_torch(path)
    raise WeightsError(f"{path}: unknown weights format {suffix!r}; expected one of {list(WEIGHT_SUFFIXES)}")


def write_state_dict(state_dict: Mapping[str, np.ndarray], path: str) -> None:
    """Writes ``.safetensors`` (no torch needed) or ``.bin``/``.pt`` (torch.save of tensors)."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    arrays = {k: np.asarray(v, order="C") for k, v in state_dict.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(arrays, path, metadata={"format": "pt"})  # "pt": the layout torch loaders expect
    elif suffix in _TORCH_SUFFIXES:
        try:
            import torch
        except ImportError:
            raise WeightsError(f"{path}: writing {suffix} needs PyTorch (pip install 'clipjax[torch]'); "
                               ".safetensors needs nothing more") from None
        torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
    else:
        raise WeightsError(f"{path}: unknown weights format {suffix!r}; expected one of {list(WEIGHT_SUFFIXES)}")


def _normalise_keys(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Numpy float32 values; ``module.`` (DDP) prefixes, OpenAI's non-weight entries and the
    CustomTextCLIP ``text.`` layout mapped onto OpenCLIP's CLIP layout."""
    out: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key in _OPENAI_EXTRA_KEYS or key == "attn_mask" or key.endswith(".attn_mask"):
            continue  # not weights
        if key.startswith("text.") and not key.startswith("text.transformer.embeddings."):
            key = key[len("text."):]
        value = _torch_to_numpy(value) if hasattr(value, "detach") else np.asarray(value)
        out[key] = value.astype(np.float32) if value.dtype != np.float32 else value
    return out


# --------------------------------------------------------------------------- architecture


@dataclasses.dataclass(frozen=True)
class Arch:
    """What tensor shapes cannot tell about an OpenCLIP model (None: use the convention)."""

    act: str = "gelu"
    image_heads: int | None = None
    text_heads: int | None = None
    image_pool: str = "tok"
    eot_id: int | None = None  # None: pool at argmax(ids) (OpenCLIP's default); else the first eot_id
    name: str | None = None


def _name_arch(name: str, torchscript: bool) -> Arch:
    # OpenAI spells "ViT-B/32" and "ViT-L/14@336px"; OpenCLIP "ViT-B-32", "ViT-L-14-336".
    spelled = name.replace("/", "-").replace("@", "-").removesuffix("px")
    openai_name = spelled != name
    quick = spelled.endswith("-quickgelu") or openai_name or torchscript  # OpenAI trained with QuickGELU
    base = spelled.removesuffix("-quickgelu")
    m = re.fullmatch(r"(ViT-[A-Za-z]+-\d+)(-\d+)?", base)
    if not m or m.group(1) not in OPENCLIP_NAMES:
        raise WeightsError(f"model={name!r} is not a known OpenCLIP ViT name ({sorted(OPENCLIP_NAMES)}, optionally "
                           "with '-quickgelu' or an image-size suffix); pass the model's OpenCLIP config "
                           "(its model_cfg dict or JSON file) instead")
    from clipjax.models.sizes import get_size

    row = get_size(OPENCLIP_NAMES[m.group(1)])
    return Arch(act="quick_gelu" if quick else "gelu", image_heads=row["image"]["heads"],
                text_heads=row["text"]["heads"], name=name)


def _cfg_arch(cfg: Mapping[str, Any]) -> Arch:
    """Arch from an OpenCLIP model config (``{"embed_dim", "vision_cfg", "text_cfg", ...}``)."""
    cfg = cfg.get("model_cfg", cfg)
    v, t = dict(cfg.get("vision_cfg", {})), dict(cfg.get("text_cfg", {}))
    unsupported = []
    for section, d, allowed in (
            ("vision_cfg", v, {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size", "pool_type",
                               "no_ln_pre", "final_ln_after_pool", "act_kwargs", "patch_dropout", "output_tokens"}),
            ("text_cfg", t, {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pool_type",
                             "eos_id", "pad_id", "act_kwargs", "tokenizer_kwargs", "hf_tokenizer_name",
                             "output_tokens"})):
        for key, value in d.items():
            if key not in allowed and value not in (None, False, 0, 0.0, "", {}, "linear"):
                unsupported.append(f"{section}.{key}={value!r}")
    if isinstance(v.get("layers"), (list, tuple)):
        unsupported.append("vision_cfg.layers (a ResNet)")
    pool = v.get("pool_type", "tok")
    if pool not in ("tok", "avg") or (v.get("final_ln_after_pool") and pool != "tok"):
        unsupported.append(f"vision_cfg.pool_type={pool!r} (final_ln_after_pool={v.get('final_ln_after_pool')})")
    text_pool = t.get("pool_type", "argmax")
    if text_pool not in ("argmax", "eos"):
        unsupported.append(f"text_cfg.pool_type={text_pool!r}")
    if cfg.get("custom_text") and t.get("hf_model_name"):
        unsupported.append("text_cfg.hf_model_name")
    acts = {json.dumps(d.get("act_kwargs") or {}, sort_keys=True) for d in (v, t)}
    if len(acts) > 1 or acts - {"{}", '{"approximate": "tanh"}'}:
        unsupported.append(f"act_kwargs {sorted(acts)}")
    if unsupported:
        raise WeightsError(f"OpenCLIP config options clipjax does not implement: {', '.join(unsupported)}")
    act = "quick_gelu" if cfg.get("quick_gelu") else ("gelu_tanh" if acts == {'{"approximate": "tanh"}'} else "gelu")
    if act == "quick_gelu" and acts != {"{}"}:
        raise WeightsError("OpenCLIP config sets both quick_gelu and act_kwargs")
    width = v.get("width")
    image_heads = None if width is None else int(width) // int(v.get("head_width", 64))
    return Arch(act=act, image_heads=image_heads, text_heads=int(t.get("heads", 8)),
                image_pool="gap" if pool == "avg" else "tok",
                eot_id=int(t.get("eos_id", 2)) if text_pool == "eos" else None)


def _arch(model: Any, torchscript: bool) -> Arch:
    if isinstance(model, Arch):
        return model
    if model is None:
        return Arch(act="quick_gelu" if torchscript else "gelu")
    if isinstance(model, Mapping):
        return _cfg_arch(model)
    if isinstance(model, str) and model.endswith(".json"):
        try:
            with open(model, encoding="utf-8") as f:
                return _cfg_arch(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise WeightsError(f"model={model!r}: cannot read the OpenCLIP config JSON: {e}") from e
    if isinstance(model, str):
        return _name_arch(model, torchscript)
    raise WeightsError(f"model={model!r}: expected an OpenCLIP model name, config dict or JSON path")


# --------------------------------------------------------------------------- shapes -> config


def _depth(sd: Mapping[str, np.ndarray], prefix: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return len(found)


def _check_supported(sd: Mapping[str, np.ndarray]) -> None:
    for fragment, what in _UNSUPPORTED:
        if any(fragment in k for k in sd):
            raise WeightsError(f"this checkpoint uses {what}, which clipjax does not implement "
                               f"(keys containing {fragment!r})")
    needed = ("visual.class_embedding", "visual.conv1.weight", "token_embedding.weight", "text_projection")
    missing = [k for k in needed if k not in sd]
    if missing:
        some = sorted(sd)[:8]
        raise WeightsError(f"not an OpenCLIP/OpenAI ViT CLIP state_dict: missing {missing}; "
                           f"it has {len(sd)} entries such as {some}")


def _heads(width: int, given: int | None, row_heads: int | None) -> int:
    heads = given or row_heads or max(1, width // 64)
    if width % heads:
        raise WeightsError(f"width {width} is not divisible by {heads} heads; pass the model's OpenCLIP config")
    return heads


def _matching_row(m: ml_collections.ConfigDict) -> str | None:
    from clipjax.models.sizes import SIZES

    for name, row in SIZES.items():
        if row["embed_dim"] != m.embed_dim:
            continue
        if all(m.image[k] == row["image"][k] for k in ("width", "depth", "mlp_dim", "patch_size")) and all(
                m.text[k] == row["text"][k] for k in ("width", "depth", "mlp_dim")):
            return name
    return None


def model_config_from_state_dict(sd: Mapping[str, np.ndarray], arch: Arch = Arch(), *,
                                 scan: bool = True) -> ml_collections.ConfigDict:
    """The ``config.model`` of a (normalised) OpenCLIP state_dict; see the module doc for what is inferred."""
    from clipjax.config import base_config

    _check_supported(sd)
    m = base_config().model
    conv = sd["visual.conv1.weight"]  # [D, C, p, p]
    if conv.ndim != 4 or conv.shape[1] != 3 or conv.shape[2] != conv.shape[3]:
        raise WeightsError(f"visual.conv1.weight has shape {conv.shape}; expected [width, 3, patch, patch]")
    patch, tokens = conv.shape[2], sd["visual.positional_embedding"].shape[0] - 1
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise WeightsError(f"visual.positional_embedding holds {tokens} patch positions, not a square grid")
    m.embed_dim = int(sd["visual.proj"].shape[1])
    m.image.update(width=int(conv.shape[0]), depth=_depth(sd, "visual.transformer.resblocks."), patch_size=int(patch),
                   image_size=int(grid * patch), pool=arch.image_pool, class_token=True,
                   ln_pre="visual.ln_pre.weight" in sd)
    vocab, text_width = sd["token_embedding.weight"].shape
    m.text.update(width=int(text_width), depth=_depth(sd, "transformer.resblocks."), vocab_size=int(vocab),
                  context_length=int(sd["positional_embedding"].shape[0]), pool="eot", causal=True, pad_id=0,
                  eot_id=arch.eot_id)
    for tower, prefix in (("image", "visual.transformer.resblocks.0."), ("text", "transformer.resblocks.0.")):
        key = prefix + "mlp.c_fc.weight"
        if key not in sd:
            raise WeightsError(f"{key} is missing: the {tower} tower has no transformer blocks")
        m[tower].mlp_dim = int(sd[key].shape[0])
    from clipjax.models.sizes import get_size

    row = _matching_row(m)
    m.size = row or "tiny"  # every tower field is set explicitly; size only names a matching row
    m.image.heads = _heads(m.image.width, arch.image_heads, get_size(row)["image"]["heads"] if row else None)
    m.text.heads = _heads(m.text.width, arch.text_heads, get_size(row)["text"]["heads"] if row else None)
    if arch.image_heads is None and arch.text_heads is None and row is None:
        log.warning("head counts of this non-standard model follow OpenCLIP's width/64 convention "
                    "(image %d, text %d); pass its OpenCLIP config if they differ",
                    m.image.heads, m.text.heads)
    m.act = arch.act
    m.dtype = "float32"
    m.scan = bool(scan)
    # Init values only (presence of the bias is what matters): the defaults clipjax.config.validate derives.
    if "logit_bias" in sd:
        m.init_logit_bias = -10.0
    m.init_logit_scale = math.log(10.0) if "logit_bias" in sd else math.log(1 / 0.07)
    return m


# --------------------------------------------------------------------------- the mapping


def _block_shapes(pre: str, d: int, f: int) -> dict[str, tuple[int, ...]]:
    return {pre + "ln_1.weight": (d,), pre + "ln_1.bias": (d,), pre + "attn.in_proj_weight": (3 * d, d),
            pre + "attn.in_proj_bias": (3 * d,), pre + "attn.out_proj.weight": (d, d), pre + "attn.out_proj.bias": (d,),
            pre + "ln_2.weight": (d,), pre + "ln_2.bias": (d,), pre + "mlp.c_fc.weight": (f, d),
            pre + "mlp.c_fc.bias": (f,), pre + "mlp.c_proj.weight": (d, f), pre + "mlp.c_proj.bias": (d,)}


def expected_shapes(m: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """Every OpenCLIP state_dict key of the model ``m`` with its shape."""
    i, t = m.image, m.text
    p = i.patch_size
    shapes = {"visual.class_embedding": (i.width,), "visual.conv1.weight": (i.width, 3, p, p),
              "visual.positional_embedding": ((i.image_size // p) ** 2 + 1, i.width),
              "visual.ln_post.weight": (i.width,), "visual.ln_post.bias": (i.width,),
              "visual.proj": (i.width, m.embed_dim),
              "token_embedding.weight": (t.vocab_size, t.width), "positional_embedding": (t.context_length, t.width),
              "ln_final.weight": (t.width,), "ln_final.bias": (t.width,), "text_projection": (t.width, m.embed_dim),
              "logit_scale": ()}
    if i.ln_pre:
        shapes.update({"visual.ln_pre.weight": (i.width,), "visual.ln_pre.bias": (i.width,)})
    if m.init_logit_bias is not None:
        shapes["logit_bias"] = ()
    for n in range(i.depth):
        shapes.update(_block_shapes(f"visual.transformer.resblocks.{n}.", i.width, i.mlp_dim))
    for n in range(t.depth):
        shapes.update(_block_shapes(f"transformer.resblocks.{n}.", t.width, t.mlp_dim))
    return shapes


def _check_keys(sd: Mapping[str, np.ndarray], m: ml_collections.ConfigDict) -> None:
    blocks.check_keys(sd, expected_shapes(m), "state_dict does not match an OpenCLIP ViT CLIP model", WeightsError)


# OpenCLIP's residual attention block (torch nn.MultiheadAttention: fused q/k/v).
_BLOCK = blocks.TorchBlock(ln_attn="ln_1", attn="attn.", fused=True, ln_mlp="ln_2", fc="mlp.c_fc", proj="mlp.c_proj")


def params_from_state_dict(sd: Mapping[str, np.ndarray], m: ml_collections.ConfigDict) -> dict[str, Any]:
    """clipjax params (nested dicts of float32 numpy) of model ``m`` from a normalised OpenCLIP state_dict."""
    from flax import traverse_util

    _check_keys(sd, m)
    i, t = m.image, m.text
    conv = sd["visual.conv1.weight"]  # [D, C, py, px]; clipjax flattens patches as (py, px, c)
    flat = {
        "image/class_token": sd["visual.class_embedding"], "image/pos_embedding": sd["visual.positional_embedding"],
        "image/patch_kernel": conv.transpose(2, 3, 1, 0).reshape(-1, conv.shape[0]),
        "image/ln_post/scale": sd["visual.ln_post.weight"], "image/ln_post/bias": sd["visual.ln_post.bias"],
        "image/proj": sd["visual.proj"],
        "text/token_embedding": sd["token_embedding.weight"], "text/pos_embedding": sd["positional_embedding"],
        "text/ln_final/scale": sd["ln_final.weight"], "text/ln_final/bias": sd["ln_final.bias"],
        "text/proj": sd["text_projection"],
        "logit_scale": sd["logit_scale"].reshape(()),
    }
    if i.ln_pre:
        flat["image/ln_pre/scale"], flat["image/ln_pre/bias"] = sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"]
    if m.init_logit_bias is not None:
        flat["logit_bias"] = sd["logit_bias"].reshape(())
    for tower, prefix, tm in (("image", "visual.transformer.resblocks.", i), ("text", "transformer.resblocks.", t)):
        layers = [blocks.block_from_torch(sd, f"{prefix}{n}.", _BLOCK, tm.heads) for n in range(tm.depth)]
        flat.update(blocks.prefixed(f"{tower}/transformer/", blocks.stack(layers, m.scan)))
    flat = {k: np.asarray(v, dtype=np.float32, order="C") for k, v in flat.items()}
    return traverse_util.unflatten_dict(flat, sep="/")


def state_dict_from_params(params: Any, m: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """The OpenCLIP state_dict (float32 numpy) of clipjax ``params`` of model ``m`` (inverse of the above)."""
    from flax import linen as nn
    from flax import traverse_util

    check_exportable(m)
    flat = {k: np.asarray(v, dtype=np.float32)
            for k, v in traverse_util.flatten_dict(nn.unbox(params), sep="/").items()}
    i, t = m.image, m.text
    kernel = flat["image/patch_kernel"]
    p = i.patch_size
    sd = {
        "visual.class_embedding": flat["image/class_token"], "visual.positional_embedding": flat["image/pos_embedding"],
        "visual.conv1.weight": kernel.reshape(p, p, 3, -1).transpose(3, 2, 0, 1),
        "visual.ln_post.weight": flat["image/ln_post/scale"], "visual.ln_post.bias": flat["image/ln_post/bias"],
        "visual.proj": flat["image/proj"],
        "token_embedding.weight": flat["text/token_embedding"], "positional_embedding": flat["text/pos_embedding"],
        "ln_final.weight": flat["text/ln_final/scale"], "ln_final.bias": flat["text/ln_final/bias"],
        "text_projection": flat["text/proj"], "logit_scale": flat["logit_scale"].reshape(()),
    }
    if i.ln_pre:
        sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"] = flat["image/ln_pre/scale"], flat["image/ln_pre/bias"]
    if "logit_bias" in flat:
        sd["logit_bias"] = flat["logit_bias"].reshape(())
    for tower, prefix, tm in (("image", "visual.transformer.resblocks.", i), ("text", "transformer.resblocks.", t)):
        for n, block in enumerate(blocks.unstack(blocks.sub(flat, f"{tower}/transformer/"), tm.depth, m.scan)):
            sd.update(blocks.block_to_torch(block, f"{prefix}{n}.", _BLOCK))
    sd = {k: np.asarray(v, order="C") for k, v in sd.items()}  # ascontiguousarray would make 0-d arrays 1-d
    _check_keys(sd, m)
    return sd


# --------------------------------------------------------------------------- export config


def check_exportable(m: ml_collections.ConfigDict) -> None:
    """Raises WeightsError naming every model setting OpenCLIP's ViT CLIP cannot express."""
    bad = []
    if m.image.pool not in ("tok", "gap"):
        bad.append(f"model.image.pool={m.image.pool!r} (OpenCLIP's ViT pools 'tok' or 'avg')")
    if not m.image.class_token:
        bad.append("model.image.class_token=False (OpenCLIP's ViT always has one)")
    if not m.text.causal:
        bad.append("model.text.causal=False (OpenCLIP masks no padding without its causal mask)")
    if m.image.get("patch_bias") or not m.image.get("proj", True) or m.text.get("proj_bias"):
        bad.append("a SigLIP tower (patch bias, no image projection or a text projection bias): "
                   "export it with clipjax.interop.hf or bigvision")
    if m.text.pool == "final":
        bad.append("model.text.pool='final'")
    if m.act not in ("gelu", "quick_gelu", "gelu_tanh"):
        bad.append(f"model.act={m.act!r}")
    if abs(m.ln_eps - 1e-5) > 1e-12:
        bad.append(f"model.ln_eps={m.ln_eps} (OpenCLIP's LayerNorm uses 1e-5)")
    if m.text.pool == "last" and m.text.get("eot_id") is None:
        bad.append("model.text.pool='last' without model.text.eot_id")
    if bad:
        raise WeightsError("cannot export to OpenCLIP: " + "; ".join(bad))


def _ratio(mlp_dim: int, width: int) -> float:
    """An mlp_ratio with int(width * ratio) == mlp_dim, as OpenCLIP sizes its MLP."""
    ratio = mlp_dim / width
    return ratio if int(width * ratio) == mlp_dim else (mlp_dim + 0.5) / width


def openclip_model_config(m: ml_collections.ConfigDict) -> dict[str, Any]:
    """OpenCLIP's ``model_cfg`` (the dict of its model JSON files) describing model ``m``.

    Text pooling: clipjax's ``eot`` at the end token maps to OpenCLIP's ``argmax`` when
    the end token has the largest id (CLIP's BPE) and to ``eos`` otherwise; ``last`` (the
    last non-pad token) maps to ``eos`` at ``eot_id``, the same token for every text a
    clipjax tokenizer produces (each row ends with one end token).
    """
    check_exportable(m)
    i, t = m.image, m.text
    vision: dict[str, Any] = {"image_size": int(i.image_size), "layers": int(i.depth), "width": int(i.width),
                              "patch_size": int(i.patch_size)}
    if i.width // i.heads != 64:
        vision["head_width"] = int(i.width // i.heads)
    if i.mlp_dim != 4 * i.width:
        vision["mlp_ratio"] = _ratio(i.mlp_dim, i.width)
    if i.pool == "gap":
        vision["pool_type"] = "avg"
    if not i.ln_pre:
        vision["no_ln_pre"] = True
    text: dict[str, Any] = {"context_length": int(t.context_length), "vocab_size": int(t.vocab_size),
                            "width": int(t.width), "heads": int(t.heads), "layers": int(t.depth)}
    if t.mlp_dim != 4 * t.width:
        text["mlp_ratio"] = _ratio(t.mlp_dim, t.width)
    eot = t.get("eot_id")
    if eot is not None and eot != t.vocab_size - 1:
        text.update(pool_type="eos", eos_id=int(eot))
    if m.act == "gelu_tanh":
        vision["act_kwargs"] = text["act_kwargs"] = {"approximate": "tanh"}
    cfg: dict[str, Any] = {"embed_dim": int(m.embed_dim)}
    if m.act == "quick_gelu":
        cfg["quick_gelu"] = True
    cfg.update(vision_cfg=vision, text_cfg=text)
    if m.init_logit_bias is not None:
        cfg["init_logit_bias"] = float(m.init_logit_bias)
    return cfg


def openclip_name(m: ml_collections.ConfigDict) -> str | None:
    """The stock OpenCLIP model name of ``m`` (``"ViT-B-32-quickgelu"``...), or None for a custom model."""
    from clipjax.config import base_config
    from clipjax.models.sizes import get_size

    mine = openclip_model_config(m)
    for name, size in OPENCLIP_NAMES.items():
        row = get_size(size)
        ref = base_config().model
        ref.size, ref.embed_dim, ref.act = size, row["embed_dim"], m.act
        ref.image.update(row["image"])
        ref.text.update(row["text"], vocab_size=49408, eot_id=49407)
        if openclip_model_config(ref) == mine:
            return name + ("-quickgelu" if m.act == "quick_gelu" else "")
    return None


# --------------------------------------------------------------------------- public API


def import_weights(source: Any, model: Any = None, *, scan: bool = True) -> tuple[ml_collections.ConfigDict, dict]:
    """``(config.model, params)`` from an OpenCLIP/OpenAI checkpoint path or in-memory state_dict.

    ``model``: an OpenCLIP model name, model config dict or JSON path (what shapes cannot
    tell; see the module doc). ``params`` are float32 numpy arrays laid out for
    ``build_model(model_config)`` (blocks stacked when ``scan``).
    """
    torchscript = False
    if isinstance(source, (str, os.PathLike)):
        raw, torchscript = read_state_dict(os.fspath(source))
    elif isinstance(source, Mapping):
        raw = _unwrap(source, "state_dict")
    else:
        raise WeightsError(f"source: expected a weights file path or a state_dict, got {type(source).__name__}")
    sd = _normalise_keys(raw)
    m = model_config_from_state_dict(sd, _arch(model, torchscript), scan=scan)
    return m, params_from_state_dict(sd, m)


def export_weights(params: Any, model_config: ml_collections.ConfigDict, path: str) -> dict[str, Any]:
    """Writes ``params`` as an OpenCLIP state_dict (``.safetensors``, or ``.bin``/``.pt`` with torch).

    Returns the OpenCLIP model config (``model_cfg``) that loads it; ``openclip_name``
    gives the stock name when there is one.
    """
    write_state_dict(state_dict_from_params(params, model_config), path)
    return openclip_model_config(model_config)


def load_params(path: str, abstract_params: Any, *, init_logit_bias: float | None = None) -> Any:
    """A weights file's params on ``abstract_params``'s structure and shardings (``checkpoint.init_from``):
    OpenCLIP/OpenAI files, a transformers directory (``config.json``) or a big_vision ``.npz``.

    Head counts and the stacked/unrolled block layout come from ``abstract_params``; a
    logit bias the file lacks starts at ``init_logit_bias`` (0 when None), one the model
    lacks is dropped.
    """
    import jax
    from flax import traverse_util

    want = traverse_util.flatten_dict(abstract_params, sep="/")
    scan = any("/blocks/" in k for k in want)
    if os.path.isdir(path) or path.endswith("config.json"):
        from clipjax.interop import hf

        _, params = hf.import_weights(path, scan=scan)
    elif path.endswith(".npz"):
        from clipjax.interop import bigvision

        _, params = bigvision.import_weights(path, scan=scan)
    else:
        heads = {}
        for tower in ("image", "text"):
            key = next(k for k in want if k.startswith(f"{tower}/transformer/") and k.endswith("attn/query_kernel"))
            heads[tower] = want[key].shape[-2]
        _, params = import_weights(path, Arch(image_heads=heads["image"], text_heads=heads["text"]), scan=scan)
    got = traverse_util.flatten_dict(params, sep="/")
    if "logit_bias" in want and "logit_bias" not in got:
        got["logit_bias"] = np.asarray(init_logit_bias or 0.0, np.float32)
        log.info("%s has no logit_bias; it starts at %s", path, float(got["logit_bias"]))
    if "logit_bias" in got and "logit_bias" not in want:
        del got["logit_bias"]
        log.info("%s has a logit_bias; this model has none, so it is dropped", path)
    wrong = [f"{k}: file {got[k].shape} vs model {tuple(want[k].shape)}" for k in want
             if k in got and got[k].shape != tuple(want[k].shape)]
    missing = sorted(set(want) - set(got))
    if wrong or missing:
        hint = ""
        if any(k.startswith("image/pos_embedding") for k in wrong):
            hint = " (model.image.image_size / patch_size must match the file's)"
        raise WeightsError("weights do not fit this model: " + "; ".join(wrong + missing)[:600] + hint)
    return jax.tree.map(lambda a, k: jax.make_array_from_callback(a.shape, a.sharding, lambda idx: got[k][idx]),
                        abstract_params, traverse_util.unflatten_dict({k: k for k in want}, sep="/"))
