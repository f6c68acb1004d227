"""Runs the evaluations of ``config.evals`` at their cadence: zero-shot, retrieval and captioning passes.

``Evaluator(config, setup)`` is ``evaluate(step, state, writer, final=False)`` for the
training loop; ``Evaluator.run(params)`` backs ``clipjax-eval`` (``clipjax.evaluate``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from clipjax import sharding
from clipjax.data import resize
from clipjax.errors import UserError
from clipjax.evals import datasets, preflight
from clipjax.evals import retrieval as retrieval_lib
from clipjax.evals import zeroshot as zeroshot_lib
from clipjax.evals.config import default_split
from clipjax.evals.encoders import Encoders, put_global, to_host
from clipjax.evals.report import headline_table

log = logging.getLogger("clipjax")


def _check_labels(name: str, entry, labels: np.ndarray, num_classes: int) -> None:
    """Zero-shot needs labelled examples, each naming one of the class names; else a UserError."""
    where = f"config.evals.{name}: split {default_split(entry)!r}" + (f" of {entry.path}" if entry.path else "")
    labelled = labels[labels >= 0]
    if not labelled.size:
        raise UserError(f"{where} has no labelled examples, so zero-shot accuracy is undefined; convert it with "
                        "labels (clipjax-data convert csv --label_column=COL, convert folder, COCO categories) or "
                        "point the entry at a labelled split")
    if labelled.max() >= num_classes:
        raise UserError(f"{where} has labels up to {int(labelled.max())} but classnames lists {num_classes} "
                        f"names; give one name per label, in label order (e.g. classnames=<data>/classes.txt)")


class Evaluator:
    """Callable ``evaluate(step, state, writer, final=False) -> metrics`` over ``config.evals``.

    ``setup`` provides ``model``, ``mesh`` and ``rules`` (a ``train_step.Setup``).
    """

    def __init__(self, config, setup):
        self.config, self.mesh, self.rules = config, setup.mesh, setup.rules
        self.entries: dict[str, Any] = {name: config.evals[name] for name in config.evals}
        self.encoders = Encoders(setup.model, config.model, config.data.interpolation)
        # zero-shot entry -> (class names, templates, tokenizer); what fails here fails before training
        self._prompts: dict[str, tuple] = preflight.check_entries(config)
        self._model = setup.model
        self._greedy = None  # the compiled greedy decoder, built by the first captioning entry
        multiple = math.lcm(sharding.batch_size_divisor(self.mesh), jax.process_count())
        self._round = lambda b: -(-int(b) // multiple) * multiple

    def due(self, step: int, final: bool) -> list[str]:
        return [n for n, e in self.entries.items() if final or (e.every > 0 and step % e.every == 0)]

    def __call__(self, step: int, state, writer, final: bool = False) -> dict[str, float]:
        """Runs the evals due at ``step``; logs their numbers and prints the headline table."""
        names = self.due(step, final)
        if not names:
            return {}
        metrics, chance = self.run(state.params, names)
        writer.write(step, metrics)
        writer.progress.table("evaluation", headline_table(metrics, chance), step)
        return metrics

    def run(self, params, names=None) -> tuple[dict[str, float], dict[str, float]]:
        """Runs the named evals (default: all); returns (metrics, chance levels), flat keys."""
        metrics: dict[str, float] = {}
        chance: dict[str, float] = {}
        for name in names if names is not None else list(self.entries):
            e = self.entries[name]
            t0 = time.perf_counter()
            with contextlib.ExitStack() as stack:
                stack.enter_context(jax.set_mesh(self.mesh))
                stack.enter_context(nn.logical_axis_rules(self.rules))
                run = {"zeroshot": self._zeroshot, "retrieval": self._retrieval, "captioning": self._captioning}
                m, c = run[e.kind](name, e, params)
            prefix = f"{e.kind}/{name}/"
            metrics.update({prefix + k: v for k, v in m.items()})
            chance.update({prefix + k: v for k, v in c.items()})
            log.info("eval %s (%s) took %.1fs", name, e.kind, time.perf_counter() - t0)
        return metrics, chance

    def _zeroshot(self, name: str, e, params) -> tuple[dict[str, float], dict[str, float]]:
        data_cfg = datasets.eval_data_config(self.config, e)
        names, templates, tokenize = self._prompts[name]
        text_sh = sharding.batch_sharding(self.mesh, 2)

        def encode(ids: np.ndarray) -> np.ndarray:
            return to_host(self.encoders.text(params, put_global(ids, text_sh)))

        zcls = zeroshot_lib.class_embeddings(encode, tokenize, names, templates,
                                             batch_size=self._round(e.class_batch_size))
        zcls = put_global(zcls, sharding.replicated(self.mesh))
        ranks, labels, masks = [], [], []
        for batch in datasets.global_batches(self.config, e, data_cfg, self.mesh,
                                             batch_size=self._round(e.batch_size), max_captions=1):
            crops = resize.image_fields(batch)
            r, label, mask = (to_host(x) for x in self.encoders.zeroshot(params, crops, batch["label"],
                                                                         batch["mask"], zcls))
            ranks.append(r), labels.append(label), masks.append(mask.astype(bool))
        ranks_n, labels_n, mask_n = np.concatenate(ranks), np.concatenate(labels), np.concatenate(masks)
        _check_labels(name, e, labels_n[mask_n], len(names))
        ok_n = np.asarray(zeroshot_lib.valid_labels(labels_n, len(names), mask_n))
        if e.max_examples:
            ok_n &= np.cumsum(ok_n) <= e.max_examples
        out = zeroshot_lib.accuracy_from_ranks(ranks_n, ok_n, len(names))
        out["num_examples"] = float(ok_n.sum())
        return out, zeroshot_lib.chance(len(names))

    def _retrieval(self, name: str, e, params) -> tuple[dict[str, float], dict[str, float]]:
        data_cfg = datasets.eval_data_config(self.config, e)
        zi, zt, masks, tmasks, ids = [], [], [], [], []
        for batch in datasets.global_batches(self.config, e, data_cfg, self.mesh,
                                             batch_size=self._round(e.batch_size), max_captions=e.max_captions):
            crops = resize.image_fields(batch)
            a, b, m, tm = (to_host(x) for x in self.encoders.retrieval(params, crops, batch["text"], batch["mask"],
                                                                       batch["text_mask"]))
            zi.append(a), zt.append(b), masks.append(m), tmasks.append(tm), ids.append(to_host(batch["text"]))
        zimg, ztxt = np.concatenate(zi), np.concatenate(zt)
        mask, tmask = np.concatenate(masks).astype(bool), np.concatenate(tmasks).astype(bool)
        if e.max_examples:
            mask &= np.cumsum(mask) <= e.max_examples
        zimg_v, tmask_v = zimg[mask], tmask[mask]
        owner = np.nonzero(tmask_v)[0].astype(np.int32)  # [M] index of each caption's image
        ztxt_v = ztxt[mask][tmask_v]
        # Identical token sequences are one text: template captions of a class are right for all its images.
        tokens = np.concatenate(ids)[mask][tmask_v]
        text_id = np.unique(tokens.reshape(tokens.shape[0], -1), axis=0, return_inverse=True)[1].reshape(-1)
        return retrieval_lib.retrieval_metrics(zimg_v, ztxt_v, owner, text_id_M=text_id, mesh=self.mesh,
                                               chunk_size=e.chunk_size)

    def _captioning(self, name: str, e, params) -> tuple[dict[str, float], dict[str, float]]:
        from clipjax.data import sources, transforms
        from clipjax.data.locca import DecoderTargets
        from clipjax.data.tokenizer import get_tokenizer
        from clipjax.evals import captioning

        targets = DecoderTargets.from_config(self.config)
        if targets is None:
            raise UserError(f"config.evals.{name} is a captioning eval but model.decoder.enabled is off; "
                            "enable the decoder or drop the entry")
        data_cfg = datasets.eval_data_config(self.config, e)
        if self._greedy is None:
            self._greedy = captioning.greedy_decoder(self._model, self.config.model, self.config.data.interpolation)
        m = captioning.evaluate(
            self._greedy, params, sources.open_source(data_cfg, default_split(e)), mesh=self.mesh,
            tokenizer=get_tokenizer(data_cfg.tokenizer, context_length=self.config.model.text.context_length,
                                    bpe_path=data_cfg.bpe_path or None),
            targets=targets, opts=transforms.ImageOptions.from_config(data_cfg, self.config.model.image.image_size),
            batch_size=self._round(e.batch_size), limit=e.max_examples)
        return m, {"aref_acc": m["aref_mean_box_acc"]} if "aref_mean_box_acc" in m else {}
