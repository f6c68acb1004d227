"""LocCa decoder targets: the task of each example, its token sequence, quantised box coordinates.

The decoder's vocabulary is the text tokenizer's ``V`` ids, then ``num_bins``
coordinate ids, then four special ids: the three task tokens and the mask token of
parallel prediction. One example's sequence (``length`` ids, pad 0 after it)::

    cap   [CAP]  caption ... eot                 targets: the caption and eot
    aref  [AREF] region text ... eot x0 y0 x1 y1  targets: the four coordinates
    gcap  [GCAP] x0 y0 x1 y1 region text ... eot  targets: the text and eot

Boxes are ``(x0, y0, x1, y1)`` fractions of the training crop. An example without
a region visible in its crop is captioned. Which task and which region comes
from the example's own random generator, so a resumed run builds the same targets.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

TASKS = ("cap", "aref", "gcap")
NUM_SPECIAL = len(TASKS) + 1  # the task tokens and the parallel-prediction mask token


def quantise(box_4: np.ndarray, num_bins: int) -> np.ndarray:
    """int32 bins of coordinates in [0, 1]: bin k holds [k/n, (k+1)/n); 1.0 falls in the last."""
    return np.clip(np.floor(np.asarray(box_4, np.float64) * num_bins), 0, num_bins - 1).astype(np.int32)


def dequantise(bins_4: Any, num_bins: int):
    """The centre of each bin (numpy or jax arrays): within half a bin of any coordinate in it."""
    return (bins_4 + 0.5) / num_bins


def regions_in_crop(regions: Sequence[dict], crop_xyxy: np.ndarray, min_visible: float) -> list[tuple[np.ndarray, str]]:
    """``(box in crop fractions, text)`` of each region with at least ``min_visible`` of its area in the crop."""
    x0, y0, x1, y1 = (float(v) for v in crop_xyxy)
    out = []
    for r in regions:
        b = np.asarray(r["box"], np.float64)
        area = max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)
        c = np.clip(b, [x0, y0, x0, y0], [x1, y1, x1, y1])
        seen = max(c[2] - c[0], 0.0) * max(c[3] - c[1], 0.0)
        if area > 0 and seen >= min_visible * area:
            out.append(((c - [x0, y0, x0, y0]) / [x1 - x0, y1 - y0, x1 - x0, y1 - y0], str(r["text"])))
    return out


@dataclasses.dataclass(frozen=True)
class DecoderTargets:
    """How the pipeline writes decoder targets (built from the config by ``from_config``)."""

    text_vocab: int  # the tokenizer's vocabulary: ids below it are text
    num_bins: int
    length: int  # ids per example: the decoder's max_length inputs plus the last target
    mix: tuple[float, float, float]  # relative frequency of cap, aref, gcap among examples with regions
    min_visible: float = 0.5

    @classmethod
    def from_config(cls, config) -> "DecoderTargets | None":
        """None when ``model.decoder.enabled`` is off (the pipeline then writes no decoder fields)."""
        m, d = config.model, config.loss.decoder
        if not m.decoder.enabled:
            return None
        return cls(text_vocab=m.decoder.vocab_size - d.num_bins - NUM_SPECIAL, num_bins=d.num_bins,
                   length=m.decoder.max_length + 1, mix=(d.mix_cap, d.mix_aref, d.mix_gcap),
                   min_visible=d.min_visible)

    def coord_ids(self, box_4: np.ndarray) -> np.ndarray:
        return self.text_vocab + quantise(box_4, self.num_bins)

    def task_id(self, task: str) -> int:
        return self.text_vocab + self.num_bins + TASKS.index(task)

    @property
    def mask_id(self) -> int:
        return self.text_vocab + self.num_bins + len(TASKS)

    def build(self, caption_ids: np.ndarray, regions: Sequence[dict], crop_xyxy: np.ndarray, tokenize,
              rng: np.random.Generator) -> dict[str, np.ndarray]:
        """``{"dec_ids": int32 [length], "dec_target": bool [length]}`` of one example.

        ``caption_ids``: the contrastive caption's tokens (``[sot] ... [eot] pad``);
        ``tokenize(texts) -> [N, T]`` tokenizes region texts the same way.
        """
        visible = regions_in_crop(regions, crop_xyxy, self.min_visible) if regions else []
        task = "cap"
        if visible:
            p = np.asarray(self.mix, np.float64)
            task = TASKS[int(rng.choice(len(TASKS), p=p / p.sum()))]
        if task == "cap":
            return self.sequence(task, [], text_body(caption_ids))
        box, text = visible[int(rng.integers(len(visible)))]
        words, coords = self.fit_text(text_body(tokenize([text])[0])), list(self.coord_ids(box))
        return self.sequence(task, *((words, coords) if task == "aref" else (coords, words)))

    def fit_text(self, words: list[int]) -> list[int]:
        """Region text ids cut (keeping their last, the end token) to leave room for the task id and a box."""
        room = self.length - 5
        return words if len(words) <= room else words[:room - 1] + words[-1:]

    def sequence(self, task: str, prefix: list[int], target: list[int]) -> dict[str, np.ndarray]:
        """``[task] prefix target`` padded to ``length`` (target cut to fit), with its target flags."""
        target = target[:self.length - 1 - len(prefix)]
        ids = np.zeros((self.length,), np.int32)
        is_target = np.zeros((self.length,), bool)
        seq = [self.task_id(task), *prefix, *target]
        ids[:len(seq)] = seq
        is_target[1 + len(prefix):len(seq)] = True
        return {"dec_ids": ids, "dec_target": is_target}


def text_body(ids_T: np.ndarray) -> list[int]:
    """The tokens after the start token, through the end token (pads dropped)."""
    return [int(i) for i in ids_T[1:] if i != 0]

