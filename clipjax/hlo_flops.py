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
  parses the optimized HLO, finds each loop's ``known_trip_count`` and adds the
  ``dot`` FLOPs of the repeated iterations. Elementwise work inside loop bodies
  stays counted once (it is a small share of a transformer's FLOPs).

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


def loop_extra_flops(hlo_text: str) -> float:
    """Dot FLOPs that XLA's cost analysis misses because it counts a while body once.

    Walks the call graph of the optimized HLO module: each computation's
    multiplicity is the sum over its call sites of the caller's multiplicity,
    times ``known_trip_count`` for a while body/condition. Returns
    ``sum(dot_flops * (multiplicity - times_counted))`` where a computation
    reached through ``k`` nested loops was counted once by cost analysis.
    """
    comps: list[tuple[str, bool]] = []  # (name, is_entry) in order of appearance
    dots: dict[str, float] = {}
    calls: dict[str, list[tuple[str, int, bool]]] = {}  # caller -> [(callee, factor, is_loop)]
    shapes: dict[str, str] = {}
    current = None
    for line in hlo_text.splitlines():
        h = _COMP_HEADER.match(line)
        if h:
            current = h.group(2)
            comps.append((current, bool(h.group(1))))
            dots[current], calls[current] = 0.0, []
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
        if op == "dot":
            dots[current] += _dot_flops(shape, rest, shapes)
        trip = None
        if op == "while":
            t = _TRIP.search(rest)
            trip = int(t.group(1)) if t else None
        for kind, callee in _CALLEE.findall(rest):
            loop = kind in ("body", "condition")
            calls[current].append((callee, trip if (loop and trip) else 1, loop))
        for group in _BRANCHES.findall(rest):
            for callee in group.split(","):
                calls[current].append((callee.strip().lstrip("%"), 1, False))
    # Callees are printed before their callers: walk from the entry backwards.
    mult: dict[str, float] = {name: 0.0 for name, _ in comps}
    counted: dict[str, float] = {name: 0.0 for name, _ in comps}  # what cost analysis saw (loops once)
    for name, entry in comps:
        if entry:
            mult[name] = counted[name] = 1.0
    for name, _ in reversed(comps):
        for callee, factor, _loop in calls.get(name, []):
            if callee in mult:
                mult[callee] += mult[name] * factor
                counted[callee] += counted[name]
    return sum(dots[n] * max(mult[n] - counted[n], 0.0) for n, _ in comps)


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
