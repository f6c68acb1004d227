"""The one block mapping every format shares: torch-layout attention/MLP/LayerNorm <-> clipjax, and
per-layer <-> stacked block layouts.

clipjax's attention kernels are ``[D, N, H]`` (query/key/value) and ``[N, H, D]`` (out); torch's
``nn.Linear`` stores ``[out, in]`` and ``nn.MultiheadAttention`` fuses q/k/v into ``in_proj``. The
conversions only transpose and reshape, so round trips are bit-exact.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from clipjax.errors import UserError

Flat = dict[str, np.ndarray]


class WeightsError(UserError, ValueError):
    """A weights file, state_dict or model config that cannot be converted (the message says why)."""


@dataclasses.dataclass(frozen=True)
class TorchBlock:
    """Module names of one torch pre-norm block (``.weight``/``.bias`` appended).

    ``attn`` is the attention module's prefix; ``fused``: ``nn.MultiheadAttention``'s
    ``in_proj_weight``/``in_proj_bias`` (OpenCLIP), else ``q_proj``/``k_proj``/``v_proj`` (transformers).
    """

    ln_attn: str
    attn: str
    fused: bool
    ln_mlp: str
    fc: str
    proj: str


def attention_from_torch(sd: Mapping[str, np.ndarray], attn: str, fused: bool, heads: int) -> Flat:
    """clipjax ``MultiHeadAttention`` params from a torch attention module at prefix ``attn``."""
    if fused:
        w_in, b_in = sd[attn + "in_proj_weight"], sd[attn + "in_proj_bias"]
        d = w_in.shape[1]
        qkv = [(w_in[n * d:(n + 1) * d], b_in[n * d:(n + 1) * d]) for n in range(3)]
    else:
        qkv = [(sd[f"{attn}{n}_proj.weight"], sd[f"{attn}{n}_proj.bias"]) for n in "qkv"]
        d = qkv[0][0].shape[1]
    h = d // heads
    out = {}
    for name, (w, b) in zip(("query", "key", "value"), qkv):
        # torch computes x @ W.T with W [out, in]; clipjax's kernel is [in, heads, head_dim].
        out[f"{name}_kernel"] = w.T.reshape(d, heads, h)
        out[f"{name}_bias"] = b.reshape(heads, h)
    out["out_kernel"] = sd[attn + "out_proj.weight"].T.reshape(heads, h, -1)
    out["out_bias"] = sd[attn + "out_proj.bias"]
    return out


def attention_to_torch(p: Mapping[str, np.ndarray], attn: str, fused: bool) -> Flat:
    """Inverse of ``attention_from_torch``."""
    d = p["query_kernel"].shape[0]
    ws = [p[f"{n}_kernel"].reshape(d, -1).T for n in ("query", "key", "value")]
    bs = [p[f"{n}_bias"].reshape(-1) for n in ("query", "key", "value")]
    if fused:
        out = {attn + "in_proj_weight": np.concatenate(ws), attn + "in_proj_bias": np.concatenate(bs)}
    else:
        out = {}
        for n, w, b in zip("qkv", ws, bs):
            out[f"{attn}{n}_proj.weight"], out[f"{attn}{n}_proj.bias"] = w, b
    out[attn + "out_proj.weight"] = p["out_kernel"].reshape(-1, p["out_kernel"].shape[-1]).T
    out[attn + "out_proj.bias"] = p["out_bias"]
    return out


def linear_from_torch(sd: Mapping[str, np.ndarray], name: str, to: str) -> Flat:
    """``{to}_kernel`` ``[in, out]`` and ``{to}_bias`` of a torch ``nn.Linear`` at ``name``."""
    return {f"{to}_kernel": sd[name + ".weight"].T, f"{to}_bias": sd[name + ".bias"]}


def norm_from_torch(sd: Mapping[str, np.ndarray], name: str) -> Flat:
    return {"scale": sd[name + ".weight"], "bias": sd[name + ".bias"]}


def mlp_from_torch(sd: Mapping[str, np.ndarray], fc: str, proj: str) -> Flat:
    return {**linear_from_torch(sd, fc, "fc"), **linear_from_torch(sd, proj, "proj")}


def mlp_to_torch(p: Mapping[str, np.ndarray], fc: str, proj: str) -> Flat:
    return {fc + ".weight": p["fc_kernel"].T, fc + ".bias": p["fc_bias"],
            proj + ".weight": p["proj_kernel"].T, proj + ".bias": p["proj_bias"]}


def norm_to_torch(p: Mapping[str, np.ndarray], name: str) -> Flat:
    return {name + ".weight": p["scale"], name + ".bias": p["bias"]}


def prefixed(prefix: str, flat: Mapping[str, np.ndarray]) -> Flat:
    return {prefix + k: v for k, v in flat.items()}


def sub(flat: Mapping[str, np.ndarray], prefix: str) -> Flat:
    """The entries under ``prefix``, with it removed."""
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


def block_from_torch(sd: Mapping[str, np.ndarray], pre: str, names: TorchBlock, heads: int) -> Flat:
    """One torch block at ``pre`` -> clipjax ``Block`` params (flat, '/'-joined)."""
    return {**prefixed("attn/", attention_from_torch(sd, pre + names.attn, names.fused, heads)),
            **prefixed("ln_attn/", norm_from_torch(sd, pre + names.ln_attn)),
            **prefixed("ln_mlp/", norm_from_torch(sd, pre + names.ln_mlp)),
            **prefixed("mlp/", mlp_from_torch(sd, pre + names.fc, pre + names.proj))}


def block_to_torch(block: Mapping[str, np.ndarray], pre: str, names: TorchBlock) -> Flat:
    """Inverse of ``block_from_torch``."""
    return {**attention_to_torch(sub(block, "attn/"), pre + names.attn, names.fused),
            **norm_to_torch(sub(block, "ln_attn/"), pre + names.ln_attn),
            **norm_to_torch(sub(block, "ln_mlp/"), pre + names.ln_mlp),
            **mlp_to_torch(sub(block, "mlp/"), pre + names.fc, pre + names.proj)}


def stack(blocks: list[Flat], scan: bool, *, stacked: str = "blocks", layer: str = "block_{}") -> Flat:
    """Per-block dicts -> one tree: stacked along a leading layer axis (``nn.scan``) or one entry per layer."""
    if scan:
        return {f"{stacked}/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]}
    return {f"{layer.format(n)}/{k}": v for n, b in enumerate(blocks) for k, v in b.items()}


def unstack(flat: Mapping[str, np.ndarray], depth: int, scan: bool, *, stacked: str = "blocks",
            layer: str = "block_{}") -> list[Flat]:
    """Inverse of ``stack``: ``depth`` per-block dicts from ``flat`` (keys relative to the tower)."""
    if scan:
        inner = sub(flat, stacked + "/")
        return [{k: v[n] for k, v in inner.items()} for n in range(depth)]
    return [sub(flat, layer.format(n) + "/") for n in range(depth)]


def check_keys(got: Mapping[str, np.ndarray], want: Mapping[str, tuple[int, ...]], what: str, error: type) -> None:
    """Raises ``error`` naming every missing, unknown and wrong-shape key (one message)."""
    missing = sorted(set(want) - set(got))
    unknown = sorted(set(got) - set(want))
    wrong = [f"{k} {tuple(got[k].shape)} (expected {want[k]})" for k in sorted(set(want) & set(got))
             if tuple(got[k].shape) != tuple(want[k]) and not (np.prod(want[k]) == 1 and got[k].size == 1)]
    problems = []
    for label, keys in (("missing", missing), ("unknown", unknown), ("wrong shape", wrong)):
        if keys:
            problems.append(f"{label} ({len(keys)}): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
    if problems:
        raise error(f"{what}: " + "; ".join(problems))
