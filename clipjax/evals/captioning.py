"""Held-out captioning and referring with the LocCa decoder: greedy decoding with a KV cache.

Captioning: from the cap task token the decoder writes a caption greedily; CIDEr and
BLEU-4 (``pycocoevalcap``'s scorers, which need no Java) compare it with the example's
captions. Referring (ARef): from the aref token and a region's text the decoder
writes four coordinate tokens (the argmax over coordinate ids); a box is right when
its IoU with the true box is at least 0.5. The trivial baseline predicts the
split's mean box for every region.

Both decode one token per step for the whole batch in one compiled ``lax.scan``,
with each attention layer's keys and values cached (``layers.MultiHeadAttention``'s
``decode``): a step costs one token's work, not the prefix's again.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from clipjax import sharding
from clipjax.data import resize, transforms
from clipjax.data.locca import DecoderTargets, dequantise, regions_in_crop, text_body
from clipjax.evals.encoders import put_global, to_host
from clipjax.models import CLIP, build_decoder


def greedy_decoder(model: CLIP, model_cfg, interpolation: str) -> Callable:
    """Jitted ``(params, crops, prefix_BL, prefix_len_B, lo_B, hi_B) -> ids_BL``.

    Position t holds the prefix's id while t < prefix_len, else the argmax of the
    previous step's logits over ids in ``[lo, hi)``.
    """
    dtype, image_size = jnp.dtype(model_cfg.dtype), model_cfg.image.image_size
    dec = build_decoder(model_cfg, decode=True)

    def run(params, crops, prefix_BL, plen_B, lo_B, hi_B):
        images = resize.model_images(crops, image_size, interpolation).astype(dtype)
        _, tokens_BPD = model.apply({"params": params}, images, method=CLIP.encode_image_tokens)
        b, length = prefix_BL.shape
        shapes = jax.eval_shape(lambda: dec.init(jax.random.key(0), prefix_BL, tokens_BPD))["cache"]
        cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        ids_V = jnp.arange(model_cfg.decoder.vocab_size)
        allowed_BV = (ids_V[None] >= lo_B[:, None]) & (ids_V[None] < hi_B[:, None])

        def step(carry, t):
            cache, ids_BL = carry
            (h_B1D, w_DV), new = dec.apply({"params": params["decoder"], "cache": cache}, ids_BL[:, t, None],
                                           tokens_BPD, mutable=["cache"])
            logits_BV = jnp.einsum("bd,dv->bv", h_B1D[:, 0], w_DV, preferred_element_type=jnp.float32)
            pred_B = jnp.argmax(jnp.where(allowed_BV, logits_BV, -jnp.inf), axis=-1).astype(jnp.int32)
            nxt_B = jnp.where(t + 1 < plen_B, prefix_BL[:, t + 1], pred_B)
            return (new["cache"], ids_BL.at[:, t + 1].set(nxt_B)), None

        (_, ids_BL), _ = jax.lax.scan(step, (cache, prefix_BL), jnp.arange(length - 1))
        return ids_BL

    return jax.jit(run)


def words(text: str) -> str:
    """Lower-case words separated by single spaces: the tokenization the scorers expect."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def caption_scores(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """CIDEr(-D as in COCO) and BLEU-4 of one hypothesis per example against its references."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    res = {i: [words(h) or "empty"] for i, h in enumerate(hypotheses)}
    gts = {i: [words(r) for r in refs] for i, refs in enumerate(references)}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"cider": float(cider), "bleu4": float(bleu[3])}


def box_iou(a_N4: np.ndarray, b_N4: np.ndarray) -> np.ndarray:
    """IoU of matching rows of two ``[N, 4]`` (x0, y0, x1, y1) box arrays."""
    lo, hi = np.maximum(a_N4[:, :2], b_N4[:, :2]), np.minimum(a_N4[:, 2:], b_N4[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)
    return inter / np.maximum(area(a_N4) + area(b_N4) - inter, 1e-12)


def _examples(source, limit: int, opts: transforms.ImageOptions, targets: DecoderTargets) -> list[dict[str, Any]]:
    """Eval-cropped examples with their captions and regions (boxes in crop fractions)."""
    out = []
    for i in range(min(len(source), limit) if limit else len(source)):
        ex = source[i]
        fields = transforms.eval_image(ex["image"], opts, crop=True)
        regions = regions_in_crop(ex.get("regions") or (), fields.pop("crop_xyxy"), targets.min_visible)
        out.append({**fields, "captions": list(ex["captions"]), "regions": regions})
    return out


def evaluate(run: Callable, params, source, *, mesh, tokenizer, targets: DecoderTargets, opts, batch_size: int,
             limit: int = 0) -> dict[str, float]:
    """Captioning and referring metrics of ``run`` (``greedy_decoder``) on ``source``'s first ``limit`` examples."""
    examples = _examples(source, limit, opts, targets)
    length, v, bins = targets.length - 1, targets.text_vocab, targets.num_bins
    cap = targets.sequence("cap", [], [])["dec_ids"][:length]
    hyps, boxes, truth = [], [], []
    for start in range(0, len(examples), batch_size):
        rows = examples[start:start + batch_size]
        rows = rows + [rows[-1]] * (batch_size - len(rows))  # a full last batch: one compiled shape
        n = min(batch_size, len(examples) - start)
        crops = transforms.batch_regions(rows, opts.buffer_size)
        sh = {k: sharding.batch_sharding(mesh, x.ndim) for k, x in crops.items()}
        crops = {k: put_global(x, sh[k]) for k, x in crops.items()}
        put = lambda x: put_global(np.asarray(x, np.int32), sharding.batch_sharding(mesh, np.ndim(x)))
        ones, zeros = np.ones((batch_size,)), np.zeros((batch_size,))
        ids = to_host(run(params, crops, put(np.tile(cap, (batch_size, 1))), put(ones), put(zeros), put(ones * v)))
        hyps += [tokenizer.decode([int(i) for i in r[1:] if 0 < i < v]) for r in ids[:n]]
        # ARef: each example's first region (its text after the aref token); examples without one idle.
        prompts = [targets.sequence("aref", targets.fit_text(text_body(tokenizer([r["regions"][0][1]])[0])), [])
                   ["dec_ids"][:length] if r["regions"] else cap for r in rows]
        plen = [int(np.count_nonzero(p)) for p in prompts]
        if any(r["regions"] for r in rows[:n]):
            ids = to_host(run(params, crops, put(np.stack(prompts)), put(plen), put(ones * v), put(ones * (v + bins))))
            for r, p, row in zip(ids[:n], plen, rows[:n]):
                if row["regions"] and p + 4 <= length:
                    boxes.append(dequantise(r[p:p + 4] - v, bins)), truth.append(row["regions"][0][0])
    out = caption_scores(hyps, [e["captions"] for e in examples])
    out["num_examples"] = float(len(examples))
    if truth:
        pred_N4, true_N4 = np.asarray(boxes), np.asarray(truth)
        out["aref_acc"] = float(np.mean(box_iou(pred_N4, true_N4) >= 0.5))
        mean_N4 = np.broadcast_to(true_N4.mean(axis=0), true_N4.shape)
        out["aref_mean_box_acc"] = float(np.mean(box_iou(mean_N4, true_N4) >= 0.5))
        out["aref_regions"] = float(len(truth))
    return out
