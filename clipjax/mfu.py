"""Model FLOPs utilisation: FLOPs per step, peak FLOP/s per device, and their ratio.

* ``compiled_flops(compiled)``: FLOPs of one step *per device*, from XLA's cost
  analysis of the compiled executable, corrected for loops (see below).
* ``peak_flops_per_device()``: dense bf16 peak of the local accelerator from
  ``PEAK_FLOPS``; on CPU a measured fp32 matmul rate shared among the simulated
  devices; ``CLIPJAX_PEAK_FLOPS`` (FLOP/s per device) overrides both.
* ``mfu(flops, step_time, peak)``: the ratio.
* ``clip_train_flops(model_cfg, batch)``: an analytic count to cross-check the
  compiled one.

What ``Compiled.cost_analysis()`` returns (checked with jax 0.10.2, CPU):

* a ``dict`` (older jax returned a list holding one dict; both are accepted);
* for an SPMD-partitioned executable the numbers describe the partitioned
  module, i.e. **one device's share**: a ``(256,512)@(512,128)`` matmul gives
  ``2*256*512*128`` FLOPs on one device and an eighth of that with the rows
  sharded over 8 devices (``tests/test_metrics.py`` pins both);
* a ``while`` loop's body is counted **once**, whatever its trip count: a
  ``lax.scan`` over 4 layers reports the FLOPs of one. Models built with
  ``model.scan=True`` run their blocks in such a loop, so ``compiled_flops``
  parses the optimized HLO, finds each loop's ``known_trip_count`` and adds the
  ``dot`` FLOPs of the repeated iterations. Elementwise work inside loop bodies
  stays counted once (it is a small share of a transformer's FLOPs).

The compiled count includes everything the executable does, rematerialised
forward passes included, so with ``model.remat`` it is closer to hardware FLOPs
than to model FLOPs; ``clip_train_flops`` counts model FLOPs only.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

# Dense (no sparsity) bf16 peak FLOP/s per chip, keyed by a substring of
# ``jax.Device.device_kind`` (matched case-insensitively, longest key first, so
# "TPU v5 lite" wins over "TPU v5" and "H100 PCIe" over "H100").
# Source for every row: the vendor spec sheet (Google Cloud TPU system
# architecture pages; NVIDIA data sheets, dense Tensor Core BF16 figures).
PEAK_FLOPS: dict[str, float] = {
    "TPU v2": 45e12,
    "TPU v3": 123e12,
    "TPU v4": 275e12,
    "TPU v4 lite": 138e12,  # v4i
    "TPU v5 lite": 197e12,  # v5e reports itself as "TPU v5 lite"
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p reports itself as "TPU v5"
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # Trillium (v6e) reports itself as "TPU v6 lite"
    "TPU v6e": 918e12,
    "TPU v6": 918e12,
    "TPU7x": 2307e12,  # Ironwood
    "TPU v7": 2307e12,
    "A100": 312e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L4": 121e12,
    "L40S": 362e12,
    "H100": 989e12,  # SXM; device_kind e.g. "NVIDIA H100 80GB HBM3"
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H800": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "B100": 1750e12,
    "B200": 2250e12,
    "GB200": 2500e12,
}

PEAK_ENV = "CLIPJAX_PEAK_FLOPS"

_PEAK_CACHE: dict[tuple, tuple[float, str]] = {}


def lookup_peak(kind: str) -> tuple[float, str] | None:
    """``(flops, key)`` for the longest ``PEAK_FLOPS`` key found in ``kind``, or None."""
    low = kind.lower()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key.lower() in low:
            return PEAK_FLOPS[key], key
    return None


def peak_for_kind(kind: str) -> float:
    """Peak FLOP/s per device for a device kind such as ``"TPU v5p"``; ValueError if unknown."""
    hit = lookup_peak(kind)
    if hit is None:
        raise ValueError(f"no peak FLOP/s known for device kind {kind!r}; known: {sorted(PEAK_FLOPS)} "
                         f"(pass the peak explicitly or set {PEAK_ENV})")
    return hit[0]


def measure_cpu_matmul_flops(device=None, n: int = 1024, repeats: int = 5) -> float:
    """Best-of-``repeats`` FLOP/s of a jitted fp32 ``n x n @ n x n`` matmul on ``device``."""
    device = device or jax.local_devices(backend="cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    b = jax.device_put(jnp.full((n, n), 0.5, jnp.float32), device)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()  # compile and warm up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def peak_flops_per_device(device=None) -> tuple[float, str]:
    """``(peak FLOP/s of one device, how it was obtained)``; cached per device kind.

    Sources, in order: ``$CLIPJAX_PEAK_FLOPS`` ("env CLIPJAX_PEAK_FLOPS");
    CPU: the measured fp32 matmul rate of the host divided by the number of
    simulated CPU devices, which share its cores ("measured CPU matmul");
    otherwise the ``PEAK_FLOPS`` row ("table: <key>"). An accelerator missing
    from the table gives ``(nan, "unknown: <kind>")``, so MFU is logged as null.
    """
    env = os.environ.get(PEAK_ENV)
    if env:
        return float(env), f"env {PEAK_ENV}"
    device = device or jax.local_devices()[0]
    count = jax.local_device_count(backend="cpu") if device.platform == "cpu" else 1
    key = (device.platform, device.device_kind, count)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    if device.platform == "cpu":
        out = (measure_cpu_matmul_flops(device) / count, "measured CPU matmul")
    else:
        hit = lookup_peak(device.device_kind)
        if hit is None:
            log.warning("no peak FLOP/s known for %r; MFU will be NaN (set %s)", device.device_kind, PEAK_ENV)
            out = (float("nan"), f"unknown: {device.device_kind}")
        else:
            out = (hit[0], f"table: {hit[1]}")
    _PEAK_CACHE[key] = out
    return out


# --- FLOPs from the compiled executable -------------------------------------------------------

_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->\s*.*\{\s*$")
_PARAM = re.compile(r"([\w.\-]+):\s*([a-z]\w*\[[0-9,]*\])")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+?)(?:\{[^}]*\})?\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"^[a-z]\w*\[([0-9,]*)\]")
_CALLEE = re.compile(r"(calls|body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


def _dims(shape: str) -> list[int] | None:
    m = _ARRAY.match(shape)
    if m is None:
        return None
    return [int(x) for x in m.group(1).split(",") if x]


def _dot_flops(out_shape: str, args: str, shapes: dict[str, str]) -> float:
    """2 * |out| * prod(lhs contracting dims) for one HLO ``dot``; 0 when shapes are unreadable."""
    out = _dims(out_shape)
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", args)
    operands = args.split(")", 1)[0]
    first = operands.split(",")[0].strip()
    inline = _ARRAY.match(first)  # some printers write "f32[4,8]{1,0} %x"
    lhs = _dims(first) if inline else _dims(shapes.get(first.lstrip("%"), ""))
    if out is None or lhs is None or m is None:
        return 0.0
    k = math.prod(lhs[int(i)] for i in m.group(1).split(",") if i)
    return 2.0 * math.prod(out) * k


_CONST = re.compile(r"^s(?:32|64)\[\]")
_CYCLES = re.compile(r'"estimated_cycles"\s*:\s*"(\d+)"')


def _loop_weighted_sums(hlo_text: str, line_weight) -> tuple[float, float]:
    """``(sum of weights times executions, sum of weights as cost analysis counts them)``.

    ``line_weight(op, shape, rest, shapes)`` weighs one instruction. Walks the call
    graph of the optimized HLO module: each computation's multiplicity is the sum
    over its call sites of the caller's multiplicity, times the trip count for a
    while body/condition; cost analysis counts every loop body once. The trip
    count is XLA's ``known_trip_count`` (CPU) or, where the backend does not print
    it (TPU), the constant bound of a loop condition ``i < N`` (scans count from 0).
    """
    comps: list[tuple[str, bool]] = []  # (name, is_entry) in order of appearance
    weights: dict[str, float] = {}
    calls: dict[str, list[tuple[str, int | None, str | None]]] = {}  # caller -> [(callee, trip, condition)]
    bound: dict[str, int] = {}  # condition computation -> N of its ``i < N``
    consts: dict[str, int] = {}
    shapes: dict[str, str] = {}
    current = None
    for line in hlo_text.splitlines():
        h = _COMP_HEADER.match(line)
        if h:
            current = h.group(2)
            comps.append((current, bool(h.group(1))))
            weights[current], calls[current] = 0.0, []
            for name, shape in _PARAM.findall(h.group(3)):
                shapes[name] = shape
            continue
        if current is None:
            continue
        ins = _INSTR.match(line)
        if not ins:
            continue
        name, shape, op, rest = ins.groups()
        shapes[name] = shape
        weights[current] += line_weight(op, shape, rest, shapes)
        if op == "constant" and _CONST.match(shape):
            value = re.match(r"\s*(-?\d+)\)", rest)
            if value:
                consts[name] = int(value.group(1))
        if op == "compare" and "direction=LT" in rest and line.lstrip().startswith("ROOT"):
            operands = [o.strip().lstrip("%") for o in rest.split(")", 1)[0].split(",")]
            if len(operands) == 2 and operands[1] in consts:
                bound[current] = consts[operands[1]]
        trip, cond = None, None
        if op == "while":
            t = _TRIP.search(rest)
            trip = int(t.group(1)) if t else None
            c = re.search(r"condition=%?([\w.\-]+)", rest)
            cond = c.group(1) if c else None
        for kind, callee in _CALLEE.findall(rest):
            calls[current].append((callee, trip, cond) if kind in ("body", "condition") else (callee, 1, None))
        for group in _BRANCHES.findall(rest):
            for callee in group.split(","):
                calls[current].append((callee.strip().lstrip("%"), 1, None))
    # Callees are printed before their callers: walk from the entry backwards.
    mult: dict[str, float] = {name: 0.0 for name, _ in comps}
    counted: dict[str, float] = {name: 0.0 for name, _ in comps}  # what cost analysis saw (loops once)
    for name, entry in comps:
        if entry:
            mult[name] = counted[name] = 1.0
    for name, _ in reversed(comps):
        for callee, trip, cond in calls.get(name, []):
            if callee in mult:
                factor = trip if trip is not None else bound.get(cond, 1) if cond else 1
                mult[callee] += mult[name] * factor
                counted[callee] += counted[name]
    return (sum(weights[n] * mult[n] for n, _ in comps), sum(weights[n] * counted[n] for n, _ in comps))


def _valid_taps(out_size: int, in_size: int, size: int, stride: int, pad_lo: int, lhs_dilate: int,
                rhs_dilate: int) -> int:
    """Pairs (output position, window tap) of one spatial dimension that read a real input element."""
    span = (in_size - 1) * lhs_dilate + 1
    count = 0
    for o in range(out_size):
        for k in range(size):
            i = o * stride + k * rhs_dilate - pad_lo
            count += 0 <= i < span and i % lhs_dilate == 0
    return count


def _conv_flops(out_shape: str, args: str, shapes: dict[str, str]) -> float:
    """FLOPs of one HLO ``convolution`` (the TPU backend writes dots as these), padding and dilation exact.

    ``2 * input features * sum over output elements of the window taps that read
    real input`` (taps in padding or between dilated elements do no work).
    """
    out = _dims(out_shape)
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", args)
    operands = [o.strip() for o in args.split(")", 1)[0].split(",")]
    if out is None or labels is None or len(operands) < 2:
        return 0.0

    def shape_of(operand):
        return _dims(operand) if _ARRAY.match(operand) else _dims(shapes.get(operand.lstrip("%"), ""))

    lhs, rhs = shape_of(operands[0]), shape_of(operands[1])
    lhs_l, rhs_l, out_l = labels.groups()
    if lhs is None or rhs is None or len(rhs) != len(rhs_l) or len(lhs) != len(lhs_l) or "i" not in rhs_l:
        return 0.0
    window = re.search(r"window=\{([^}]*)\}", args)
    fields = dict(f.split("=", 1) for f in window.group(1).split() if "=" in f) if window else {}
    spatial = sorted(c for c in out_l if c.isdigit())

    def per_dim(key, default):
        values = fields.get(key, "").split("x") if key in fields else []
        return values if len(values) == len(spatial) else [default] * len(spatial)

    work = 2.0 * rhs[rhs_l.index("i")] * math.prod(out[j] for j, c in enumerate(out_l) if not c.isdigit())
    for n, (size, stride, pad, ld, rd) in enumerate(zip(per_dim("size", "1"), per_dim("stride", "1"),
                                                        per_dim("pad", "0_0"), per_dim("lhs_dilate", "1"),
                                                        per_dim("rhs_dilate", "1"))):
        d = spatial[n]
        work *= _valid_taps(out[out_l.index(d)], lhs[lhs_l.index(d)], int(size), int(stride),
                            int(pad.split("_")[0]), int(ld), int(rd))
    return work


def _matmul_flops(op: str, shape: str, rest: str, shapes: dict[str, str]) -> float:
    if op == "dot":
        return _dot_flops(shape, rest, shapes)
    if op == "convolution":
        return _conv_flops(shape, rest, shapes)
    return 0.0


def loop_extra_flops(hlo_text: str) -> float:
    """Dot and convolution FLOPs that XLA's cost analysis misses because it counts a while body once.

    ``sum(flops * (executions - times_counted))`` over the module's computations
    (see ``_loop_weighted_sums``).
    """
    executed, counted = _loop_weighted_sums(hlo_text, _matmul_flops)
    return max(executed - counted, 0.0)


def loop_factor(hlo_text: str) -> float:
    """How much more work a step does than cost analysis counts (loops counted once), or 1.0.

    Weighs each instruction by the compiler's own ``estimated_cycles`` (printed by
    the TPU backend), so ``cost["optimal_seconds"] * loop_factor`` estimates a
    step whose scanned layers run every iteration. 1.0 where no cycle estimates
    are printed (CPU).
    """
    def cycles(op, shape, rest, shapes):
        m = _CYCLES.search(rest)
        return float(m.group(1)) if m else 0.0

    executed, counted = _loop_weighted_sums(hlo_text, cycles)
    return executed / counted if counted else 1.0


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of ``compiled`` on one device (SPMD: that device's share), or None.

    ``compiled`` is a ``jax.stages.Compiled`` (``jax.jit(f).lower(...).compile()``).
    Cost analysis total plus the dot FLOPs of repeated loop iterations (module docstring).
    """
    try:
        cost = compiled.cost_analysis()
    except Exception as e:  # some backends do not implement it
        log.warning("cost analysis unavailable: %s", e)
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or not cost.get("flops"):
        return None
    flops = float(cost["flops"])
    try:
        flops += loop_extra_flops(compiled.as_text())
    except Exception as e:  # the correction is best effort; the base count stands
        log.warning("could not correct FLOPs for loop trip counts: %s", e)
    return flops


def mfu(flops_per_device_per_step: float, step_time_s: float, peak_per_device: float) -> float:
    """Achieved FLOP/s per device over peak FLOP/s per device; NaN when undefined."""
    if not step_time_s or step_time_s <= 0 or not peak_per_device or not math.isfinite(peak_per_device):
        return float("nan")
    return flops_per_device_per_step / step_time_s / peak_per_device


# --- Analytic count ---------------------------------------------------------------------------


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def transformer_forward_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
    """Forward matmul FLOPs of pre-norm blocks for one sequence of ``tokens`` tokens.

    Per layer and token: qkv + output projections ``2*4*d^2``, MLP ``2*2*d*mlp``,
    scores and weighted values ``2*2*T*d`` (dense: a causal mask saves nothing).
    """
    d, t = width, tokens
    per_token = 2 * (4 * d * d + 2 * d * mlp_dim) + 4 * t * d
    return float(depth * t * per_token)


def vit_flops(image_size: int, patch_size: int, width: int, depth: int, mlp_dim: int, embed_dim: int,
              class_token: bool = True, channels: int = 3) -> float:
    """Forward matmul FLOPs of the image tower for one image (patchify, blocks, projection)."""
    patches = (image_size // patch_size) ** 2
    tokens = patches + int(class_token)
    embed = 2 * patches * patch_size * patch_size * channels * width
    return embed + transformer_forward_flops(tokens, width, depth, mlp_dim) + 2 * width * embed_dim


def text_flops(context_length: int, width: int, depth: int, mlp_dim: int, embed_dim: int) -> float:
    """Forward matmul FLOPs of the text tower for one caption (the token embedding is a gather)."""
    return transformer_forward_flops(context_length, width, depth, mlp_dim) + 2 * width * embed_dim


def clip_train_flops(model_cfg: Any, batch: int) -> float:
    """Model FLOPs of one training step for the global ``batch`` (all devices together).

    ``3 * forward`` (backward is twice the forward) for both towers, plus the
    ``batch x batch`` similarity matrix: ``2*B*B*E`` forward, ``6*B*B*E`` with
    its gradients. ``model_cfg`` is a resolved ``config.model`` (or a dict with
    the same keys). Rematerialisation is not counted (model FLOPs, not hardware).
    Divide by the device count for the per-device figure.
    """
    img, txt = _get(model_cfg, "image"), _get(model_cfg, "text")
    e = _get(model_cfg, "embed_dim")
    f_img = vit_flops(_get(img, "image_size", 224), _get(img, "patch_size"), _get(img, "width"),
                      _get(img, "depth"), _get(img, "mlp_dim"), e, bool(_get(img, "class_token", True)))
    f_txt = text_flops(_get(txt, "context_length", 77), _get(txt, "width"), _get(txt, "depth"),
                       _get(txt, "mlp_dim"), e)
    return 3.0 * batch * (f_img + f_txt) + 6.0 * batch * batch * e
