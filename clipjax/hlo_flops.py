"""FLOPs of one compiled step per device: XLA's cost analysis, corrected for loops.

What ``Compiled.cost_analysis()`` returns (checked with jax 0.10.2, CPU):

* a ``dict`` (older jax returned a list holding one dict; both are accepted);
* for an SPMD-partitioned executable the numbers describe the partitioned
  module, i.e. **one device's share**: a ``(256,512)@(512,128)`` matmul gives
  ``2*256*512*128`` FLOPs on one device and an eighth of that with the rows
  sharded over 8 devices (``tests/test_metrics.py`` pins both);
* a ``while`` loop's body is counted **once**, whatever its trip count: a
  ``lax.scan`` over 4 layers reports the FLOPs of one. Models built with
  ``model.scan=True`` run their blocks in such a loop, so ``compiled_flops``
  parses the optimized HLO, finds each loop's trip count (``known_trip_count``
  on CPU; the ``i < N`` bound of its condition on TPU) and adds the ``dot`` and
  ``convolution`` FLOPs of the repeated iterations (the TPU backend writes dots
  as convolutions). Elementwise work inside loop bodies stays counted once (it
  is a small share of a transformer's FLOPs). The TPU compiler's
  ``optimal_seconds`` has the same blind spot: ``loop_factor`` scales it.

The count includes everything the executable does, rematerialised forward
passes included, so with ``model.remat`` it is closer to hardware FLOPs than to
model FLOPs (``mfu.clip_train_flops`` counts model FLOPs only).
"""

from __future__ import annotations

import logging
import math
import re

log = logging.getLogger("clipjax")

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

    ``line_weight(op, shape, rest, shapes)`` weighs one instruction (see ``loop_weighted_by_key``).
    """
    executed, counted = loop_weighted_by_key(hlo_text, lambda *a: {"": line_weight(*a)})
    return executed.get("", 0.0), counted.get("", 0.0)


def loop_weighted_by_key(hlo_text: str, line_weights) -> tuple[dict[str, float], dict[str, float]]:
    """``({key: sum of weights times executions}, {key: sum of weights as cost analysis counts them})``.

    ``line_weights(op, shape, rest, shapes)`` weighs one instruction under one or more keys. Walks the call
    graph of the optimized HLO module: each computation's multiplicity is the sum
    over its call sites of the caller's multiplicity, times the trip count for a
    while body/condition; cost analysis counts every loop body once. The trip
    count is XLA's ``known_trip_count`` (CPU) or, where the backend does not print
    it (TPU), the constant bound of a loop condition ``i < N`` (scans count from 0).
    """
    comps: list[tuple[str, bool]] = []  # (name, is_entry) in order of appearance
    weights: dict[str, dict[str, float]] = {}
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
            weights[current], calls[current] = {}, []
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
        for key, w in line_weights(op, shape, rest, shapes).items():
            if w:
                weights[current][key] = weights[current].get(key, 0.0) + w
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
    executed: dict[str, float] = {}
    seen: dict[str, float] = {}
    for n, _ in comps:
        for key, w in weights[n].items():
            executed[key] = executed.get(key, 0.0) + w * mult[n]
            seen[key] = seen.get(key, 0.0) + w * counted[n]
    return executed, seen


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
