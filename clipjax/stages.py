"""Training phases: the image size, text length and patch mask ratio of every step.

Two config fields cut a run into phases:

* ``train.stages``: ``((steps, image_size, context_length), ...)``, the first
  steps of the run at reduced sizes (CLIPA); a stage ``(steps, "naflex", seq_len,
  context_length)`` feeds NaFlex patches (native aspect ratio, at most ``seq_len``
  of them). The steps after the last stage run at the model's own size
  (``model.image.image_size`` or, when ``model.image.seq_len`` > 0, NaFlex at that
  length, and ``model.text.context_length``): SigLIP 2 switches to NaFlex near the end;
* ``train.unmasked_steps``: the last N steps run with ``mask_ratio`` 0 (FLIP's
  unmasked tuning); before them ``model.image.mask_ratio`` applies.

Parameters always keep the model's own shapes: at a smaller image size the
image tower resamples its position table on the fly, a shorter text uses the
first positions. So the train state is the same in every phase and a
checkpoint taken in any phase resumes exactly. Each distinct phase has its own
compiled step (shapes differ) and its own data pipeline sizes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from clipjax.models.masking import num_kept


@dataclasses.dataclass(frozen=True)
class Phase:
    """What a train step sees: image side (or NaFlex patch budget), token count, fraction of patches dropped."""

    image_size: int
    context_length: int
    mask_ratio: float = 0.0
    seq_len: int = 0  # > 0: NaFlex input of at most this many patches (image_size then unused)

    @property
    def input_sizes(self) -> tuple[int, int, int]:
        """What the input pipeline's batches depend on (a change needs a new pipeline)."""
        return self.image_size, self.context_length, self.seq_len


def final_phase(config: Any) -> Phase:
    """The model's own sizes with the configured mask ratio (a run without stages)."""
    m = config.model
    return Phase(int(m.image.image_size), int(m.text.context_length), float(m.image.get("mask_ratio", 0.0)),
                 int(m.image.get("seq_len", 0)))


def phases(config: Any) -> list[tuple[int, int, Phase]]:
    """``[(first_step, end_step, phase), ...]`` covering steps ``[0, train.steps)`` in order.

    Consecutive steps with equal phases are merged.
    """
    total = int(config.train.steps)
    full = final_phase(config)
    unmasked_from = total - int(config.train.get("unmasked_steps", 0))
    cuts = []  # (first_step, image_size, context_length, seq_len) from the stage list, then the model's
    start = 0
    for stage in config.train.get("stages", ()):
        if stage[1] == "naflex":
            cuts.append((start, full.image_size, int(stage[3]), int(stage[2])))
        else:
            cuts.append((start, int(stage[1]), int(stage[2]), 0))
        start += int(stage[0])
    cuts.append((start, full.image_size, full.context_length, full.seq_len))
    boundaries = sorted({0, total, unmasked_from, *(c[0] for c in cuts)})
    out: list[tuple[int, int, Phase]] = []
    for first, end in zip(boundaries, boundaries[1:]):
        if not 0 <= first < end <= total:
            continue
        _, size, length, seq_len = [c for c in cuts if c[0] <= first][-1]
        phase = Phase(size, length, 0.0 if first >= unmasked_from else full.mask_ratio, seq_len)
        if out and out[-1][2] == phase:
            out[-1] = (out[-1][0], end, phase)
        else:
            out.append((first, end, phase))
    return out


def phase_at(config: Any, step: int) -> Phase:
    """The phase of the step that starts with ``step`` completed steps."""
    for first, end, phase in phases(config):
        if first <= step < end:
            return phase
    return phases(config)[-1][2]  # past the end (a finished run): its last phase


def data_config(config: Any, phase: Phase) -> Any:
    """A copy of a validated ``config`` with the phase's sizes, mask ratio and crop buffer: what the
    input pipeline builds from, the batch the phase's step takes and the FLOPs it does."""
    from clipjax.data.transforms import ImageOptions

    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.model.image.image_size = phase.image_size
        c.model.text.context_length = phase.context_length
        c.model.image.mask_ratio = phase.mask_ratio
        c.model.image.seq_len = phase.seq_len
        c.data.buffer_size = ImageOptions.from_config(c.data, phase.image_size).buffer_size
    return c


def validate_stages(config: Any) -> None:
    """Raises ValueError naming the first bad ``train.stages`` / ``train.unmasked_steps`` / mask value."""
    m, t = config.model, config.train
    ratio = float(m.image.mask_ratio)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"model.image.mask_ratio={ratio} must be in [0, 1) (FLIP uses 0.5 or 0.75)")
    if not 0 <= t.unmasked_steps <= t.steps:
        raise ValueError(f"train.unmasked_steps={t.unmasked_steps} must be in [0, train.steps={t.steps}]")
    total = 0
    for i, stage in enumerate(t.stages):
        key = f"train.stages[{i}]={tuple(stage)!r}"
        naflex = len(stage) == 4 and stage[1] == "naflex"
        ints = [v for j, v in enumerate(stage) if not (naflex and j == 1)]
        if len(stage) != 3 + naflex or not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
            raise ValueError(f"{key}: each stage is (steps, image_size, context_length) integers, e.g. "
                             f"((9000, 112, 32),), or (steps, 'naflex', seq_len, context_length), e.g. "
                             f"((1000, 'naflex', 256, 64),)")
        steps, image_size, context_length = (stage[0], *stage[2:]) if naflex else stage
        if steps <= 0:
            raise ValueError(f"{key}: steps must be positive")
        if naflex:
            if image_size <= 0:
                raise ValueError(f"{key}: seq_len must be a positive number of patches")
        elif image_size <= 0 or image_size % m.image.patch_size:
            raise ValueError(f"{key}: image_size must be a positive multiple of "
                             f"model.image.patch_size={m.image.patch_size}")
        if not 2 <= context_length <= m.text.context_length:
            raise ValueError(f"{key}: context_length must be in [2, model.text.context_length="
                             f"{m.text.context_length}] (the model has no positions beyond it)")
        total += steps
    if total > t.steps:
        raise ValueError(f"train.stages last {total} steps, more than train.steps={t.steps}")
    for first, _, phase in phases(config):
        patches = phase.seq_len or (phase.image_size // m.image.patch_size) ** 2
        if phase.mask_ratio and num_kept(patches, phase.mask_ratio) < 1:
            raise ValueError(f"model.image.mask_ratio={ratio} keeps no patch of the {patches} at image size "
                             f"{phase.image_size} (from step {first}); lower it")
