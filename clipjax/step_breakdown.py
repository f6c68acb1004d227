"""Where a TPU step's projected time goes: the TPU compiler's per-operation estimates, by category.

The TPU backend prints an ``estimated_cycles`` figure on every operation it schedules
(fusions, copies, reductions...); its ``optimal_seconds`` for the step follows them. Each
operation goes to one category from what it is and the JAX name stack in its metadata
(``jit(train_step)/transpose(jvp(CLIP.encode_image))/...`` is the image tower's backward
pass), weighted by how often it runs (scanned layers: every iteration, as
``hlo_flops.loop_factor`` counts them). The categories' cycles are then scaled so that they
sum to the projected step time, ``optimal_seconds * loop_factor``.

Collectives carry no cycle estimate: the compiler's step time counts no time for them (it
assumes they overlap with compute). ``collective_bytes`` gives their per-device output bytes
by kind instead, so that their size can be set against the interconnect.
"""

from __future__ import annotations

import math
import re

from clipjax import hlo_flops

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
DATA_MOVEMENT = ("copy", "copy-start", "copy-done", "transpose", "pad", "slice", "dynamic-slice",
                 "dynamic-update-slice", "concatenate", "reshape", "bitcast", "broadcast", "iota", "gather",
                 "scatter")
CATEGORIES = (
    "matmul: image tower", "matmul: text tower", "matmul: other", "attention scores/softmax/weighting",
    "normalisation, element-wise", "loss", "optimizer update", "copies, transposes, padding",
    "remat recomputation", "collectives",
)

_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"([a-z]\w*)\[([0-9,]*)\]")


def _computations_with_matmuls(hlo_text: str) -> set[str]:
    """Names of the computations (fused ones included) that hold a ``convolution`` or ``dot``."""
    found, current = set(), None
    for line in hlo_text.splitlines():
        h = hlo_flops._COMP_HEADER.match(line)
        if h:
            current = h.group(2)
            continue
        ins = hlo_flops._INSTR.match(line)
        if current and ins and ins.group(3) in ("convolution", "dot"):
            found.add(current)
    return found


def _collective_kind(op: str) -> str | None:
    for kind in COLLECTIVES:
        if op == kind or op.startswith(kind + "-"):
            return kind
    return None


def categorize(op: str, rest: str, matmul_comps: set[str]) -> str:
    """The category of one HLO instruction (``rest``: its text after the opcode's parenthesis)."""
    if _collective_kind(op):
        return "collectives"
    m = _OP_NAME.search(rest)
    name = m.group(1) if m else ""
    callee = _CALLS.search(rest)
    is_matmul = op in ("convolution", "dot") or (op == "fusion" and callee and callee.group(1) in matmul_comps)
    if "rematted_computation" in name:
        return "remat recomputation"
    if "encode_image" not in name and "encode_text" not in name:
        # Outside the towers: the loss (a shard_map over the embeddings, or the dense
        # similarity) and, under the skip-non-finite cond, the optimizer's update.
        if "cond/" in name or "optax" in name or "adam" in name.lower():
            return "optimizer update"
        if name and not is_matmul and op in DATA_MOVEMENT:
            return "copies, transposes, padding"
        return "loss" if name else ("copies, transposes, padding" if op in DATA_MOVEMENT else "optimizer update")
    if "/attn/" in name and ("BNTS" in name or "softmax" in name or "dot_product_attention" in name):
        return "attention scores/softmax/weighting"
    if is_matmul:
        return "matmul: image tower" if "encode_image" in name else "matmul: text tower"
    if op in DATA_MOVEMENT or (op == "fusion" and callee and re.match(r"(copy|transpose|pad|bitcast)",
                                                                       callee.group(1))):
        return "copies, transposes, padding"
    return "normalisation, element-wise"


def _shape_bytes(shape: str) -> float:
    return sum(_DTYPE_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for t, dims in _SHAPE.findall(shape))


def breakdown(hlo_text: str, step_s: float) -> dict[str, float]:
    """Seconds of the projected step per category (``CATEGORIES`` order); they sum to ``step_s``.

    ``hlo_text`` is a TPU-compiled step's ``as_text()``; ``step_s`` its projected time
    (``optimal_seconds * loop_factor``). Empty when no operation carries a cycle estimate.
    """
    matmul_comps = _computations_with_matmuls(hlo_text)

    def cycles(op, shape, rest, shapes):
        m = hlo_flops._CYCLES.search(rest)
        return {categorize(op, rest, matmul_comps): float(m.group(1))} if m else {}

    executed, _ = hlo_flops.loop_weighted_by_key(hlo_text, cycles)
    total = sum(executed.values())
    if not total:
        return {}
    return {c: step_s * executed.get(c, 0.0) / total for c in CATEGORIES}


def collective_bytes(hlo_text: str) -> dict[str, float]:
    """Per-device output bytes of each collective kind in one step, loop iterations counted."""
    def out_bytes(op, shape, rest, shapes):
        kind = _collective_kind(op)
        return {kind: _shape_bytes(shape)} if kind and not op.endswith("-done") else {}

    executed, _ = hlo_flops.loop_weighted_by_key(hlo_text, out_bytes)
    return executed
