"""Runs the configured evaluations during training and from a checkpoint.

``make_evaluator(config, setup)`` returns ``evaluate(step, state, writer, final)``
for the training loop; ``evaluate_checkpoint(config, workdir, step=None)`` backs
``clipjax-eval``. Embedding passes jit the encoders once per eval (fixed batch
shape), feed batches sharded over the batch axes and gather the results.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from clipjax import sharding
from clipjax.data import resize
from clipjax.evals import classnames as classnames_lib
from clipjax.evals import retrieval as retrieval_lib
from clipjax.evals import zeroshot as zeroshot_lib
from clipjax.evals.config import default_split
from clipjax.models import CLIP

log = logging.getLogger("clipjax.evals")


def _host(x: jax.Array) -> np.ndarray:
    """A global array as a numpy array on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _replicated_put(x: np.ndarray, sh) -> jax.Array:
    return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])


def eval_data_config(config, entry) -> ml_collections.ConfigDict:
    """``config.data`` with the eval entry's source fields swapped in (tokenizer, resizing... kept)."""
    d = ml_collections.ConfigDict(config.data.to_dict())
    d.source = entry.source
    if entry.source == "synthetic":
        d.path = entry.path or (config.data.path if config.data.source == "synthetic" else "")
    elif entry.source == "arrayrecord":
        d.path = entry.path
    else:
        d.tfds_name = entry.tfds_name
        d.tfds_data_dir = entry.tfds_data_dir or config.data.tfds_data_dir
        d.image_key, d.label_key, d.text_key = entry.image_key, entry.label_key, entry.text_key
    d.num_workers = entry.num_workers
    return d


def _folder(data_cfg) -> str:
    if data_cfg.source == "tfds":
        return ""
    if data_cfg.source == "synthetic" and not data_cfg.path:
        from clipjax.data.sources import default_synthetic_path

        return default_synthetic_path()
    return data_cfg.path


class Evaluator:
    """Callable ``evaluate(step, state, writer, final=False) -> metrics`` over ``config.evals``."""

    def __init__(self, config, setup):
        self.config, self.setup, self.mesh = config, setup, setup.mesh
        self.entries: dict[str, Any] = {name: config.evals[name] for name in config.evals}
        self.dtype = jnp.dtype(config.model.dtype)
        self._cache: dict[str, dict[str, Any]] = {}
        multiple = math.lcm(sharding.batch_size_divisor(self.mesh), jax.process_count())
        self._round = lambda b: -(-int(b) // multiple) * multiple
        model, dtype = setup.model, self.dtype
        image_size, interpolation = config.model.image.image_size, config.data.interpolation

        def enc_img(params, pixels):
            images = resize.model_images(pixels, image_size, interpolation)
            z = model.apply({"params": params}, images.astype(dtype), method=CLIP.encode_image)
            return z.astype(jnp.float32)

        def enc_txt(params, ids):
            return model.apply({"params": params}, ids, method=CLIP.encode_text).astype(jnp.float32)

        def zs_step(params, pixels, labels, mask, zcls):
            return zeroshot_lib.zeroshot_ranks(enc_img(params, pixels), zcls, labels), labels, mask

        def ret_step(params, pixels, text, mask, text_mask):
            b, k, length = text.shape
            ztxt = enc_txt(params, text.reshape(b * k, length))
            return enc_img(params, pixels), ztxt.reshape(b, k, -1), mask, text_mask

        self._enc_txt, self._zs_step, self._ret_step = jax.jit(enc_txt), jax.jit(zs_step), jax.jit(ret_step)

    # -- cadence --

    def due(self, step: int, final: bool) -> list[str]:
        return [n for n, e in self.entries.items() if final or (e.every > 0 and step % e.every == 0)]

    def __call__(self, step: int, state, writer, final: bool = False) -> dict[str, float]:
        names = self.due(step, final)
        if not names:
            return {}
        metrics, chance = self.run(state.params, names)
        report(step, writer, metrics, chance)
        return metrics

    # -- running --

    def _ctx(self):
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.setup.rules))
        return stack

    def run(self, params, names=None) -> tuple[dict[str, float], dict[str, float]]:
        """Runs the named evals (default: all); returns (metrics, chance levels), flat keys."""
        metrics: dict[str, float] = {}
        chance: dict[str, float] = {}
        for name in names if names is not None else list(self.entries):
            e = self.entries[name]
            t0 = time.perf_counter()
            with self._ctx():
                if e.kind == "zeroshot":
                    m, c = self._zeroshot(name, e, params)
                else:
                    m, c = self._retrieval(name, e, params)
            prefix = f"{e.kind}/{name}/"
            metrics.update({prefix + k: v for k, v in m.items()})
            chance.update({prefix + k: v for k, v in c.items()})
            log.info("eval %s (%s) took %.1fs", name, e.kind, time.perf_counter() - t0)
        return metrics, chance

    def _iterator(self, e, data_cfg, batch_size: int, max_captions: int):
        from clipjax.data import pipeline

        return pipeline.make_eval_iterator(
            data_cfg, split=default_split(e), batch_size=batch_size, image_size=self.config.model.image.image_size,
            context_length=self.config.model.text.context_length, max_captions=max_captions,
            num_workers=e.num_workers)

    def _batches(self, e, data_cfg, batch_size: int, max_captions: int):
        """Global (sharded) batches, stopping once ``max_examples`` rows were read (same count on all processes)."""
        it = self._iterator(e, data_cfg, batch_size, max_captions)
        limit = -(-e.max_examples // batch_size) if e.max_examples else None
        try:
            for i, batch in enumerate(it):
                if limit is not None and i >= limit:
                    break
                yield {k: jax.make_array_from_process_local_data(sharding.batch_sharding(self.mesh, v.ndim), v)
                       for k, v in batch.items() if isinstance(v, np.ndarray)}
        finally:
            it.close()
            if it.num_skipped:
                log.warning("eval on %s: %d undecodable images skipped", default_split(e), it.num_skipped)

    def _prepare(self, name: str, e) -> dict[str, Any]:
        if name in self._cache:
            return self._cache[name]
        data_cfg = eval_data_config(self.config, e)
        prep: dict[str, Any] = {"data_cfg": data_cfg}
        if e.kind == "zeroshot":
            tfds_names = None
            if e.classnames == "tfds":
                from clipjax.data import sources as sources_lib

                tfds_names = sources_lib.open_source(data_cfg, default_split(e)).class_names
            folder = _folder(data_cfg)
            if data_cfg.source == "synthetic" and folder:
                from clipjax.data import synth

                synth.ensure_synthetic(folder, data_cfg.synth)  # info.json (class list) must exist
            names = classnames_lib.get_classnames(e.classnames, folder=folder, tfds_names=tfds_names)
            templates = classnames_lib.get_templates(e.templates, folder=folder)
            from clipjax.data.tokenizer import get_tokenizer

            tok = get_tokenizer(data_cfg.tokenizer, context_length=self.config.model.text.context_length,
                                bpe_path=data_cfg.bpe_path or None)
            prep.update(classnames=names, templates=templates, tokenize=tok)
        self._cache[name] = prep
        return prep

    def _zeroshot(self, name: str, e, params) -> tuple[dict[str, float], dict[str, float]]:
        prep = self._prepare(name, e)
        names = prep["classnames"]
        cb = self._round(e.class_batch_size)
        text_sh = sharding.batch_sharding(self.mesh, 2)

        def encode(ids: np.ndarray) -> np.ndarray:
            return _host(self._enc_txt(params, _replicated_put(ids, text_sh)))

        zcls = zeroshot_lib.class_embeddings(encode, prep["tokenize"], names, prep["templates"], batch_size=cb)
        zcls = _replicated_put(zcls, sharding.replicated(self.mesh))
        ranks, oks = [], []
        for batch in self._batches(e, prep["data_cfg"], self._round(e.batch_size), max_captions=1):
            pixels = resize.image_fields(batch)
            r, labels, mask = (_host(x) for x in self._zs_step(params, pixels, batch["label"], batch["mask"], zcls))
            ranks.append(r)
            oks.append(np.asarray(zeroshot_lib.valid_labels(labels, len(names), mask)))
        ranks_n, ok_n = np.concatenate(ranks), np.concatenate(oks)
        if e.max_examples:
            ok_n &= np.cumsum(ok_n) <= e.max_examples
        out = zeroshot_lib.accuracy_from_ranks(ranks_n, ok_n, len(names))
        out["num_examples"] = float(ok_n.sum())
        return out, zeroshot_lib.chance(len(names))

    def _retrieval(self, name: str, e, params) -> tuple[dict[str, float], dict[str, float]]:
        prep = self._prepare(name, e)
        zi, zt, masks, tmasks = [], [], [], []
        for batch in self._batches(e, prep["data_cfg"], self._round(e.batch_size), max_captions=e.max_captions):
            pixels = resize.image_fields(batch)
            a, b, m, tm = (_host(x) for x in self._ret_step(params, pixels, batch["text"], batch["mask"],
                                                            batch["text_mask"]))
            zi.append(a), zt.append(b), masks.append(m), tmasks.append(tm)
        zimg, ztxt = np.concatenate(zi), np.concatenate(zt)
        mask, tmask = np.concatenate(masks).astype(bool), np.concatenate(tmasks).astype(bool)
        if e.max_examples:
            mask &= np.cumsum(mask) <= e.max_examples
        zimg_v, tmask_v = zimg[mask], tmask[mask]
        owner = np.nonzero(tmask_v)[0].astype(np.int32)  # [M] index of each caption's image
        ztxt_v = ztxt[mask][tmask_v]
        return retrieval_lib.retrieval_metrics(zimg_v, ztxt_v, owner, mesh=self.mesh, chunk_size=e.chunk_size)


def make_evaluator(config, setup) -> Evaluator:
    """``evaluate(step, state, writer, final=False)`` running each eval at its cadence and at the end."""
    return Evaluator(config, setup)


# --------------------------------------------------------------------------- reporting

_SUMMARY_SUFFIXES = ("/top1", "/top5", "_r1", "_r5", "_r10", "_median_rank", "/modality_gap", "/pos_sim",
                     "/neg_sim")


def summary_rows(metrics: Mapping[str, float], chance: Mapping[str, float]) -> list[tuple[str, float, float | None]]:
    """``(key, value, chance or None)`` for the headline metrics, in a stable order."""
    rows = []
    for key in metrics:  # run order: evals as configured, metrics as computed
        if key.endswith(_SUMMARY_SUFFIXES):
            rows.append((key, metrics[key], chance.get(key)))
    return rows


def report(step: int, writer, metrics: Mapping[str, float], chance: Mapping[str, float]) -> None:
    """Writes the scalars and prints the headline table with chance levels."""
    from clipjax.metrics import format_value

    writer.write(step, dict(metrics))
    table = {}
    for key, value, ch in summary_rows(metrics, chance):
        table[key] = format_value(value) + (f"  (chance {format_value(ch)})" if ch is not None else "")
    writer.write_summary("evaluation", table, step=step)


class _PrintWriter:
    """The two MetricWriter methods the evaluator uses, printing only (clipjax-eval)."""

    def __init__(self):
        self.rows: list[tuple[int, dict]] = []

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.rows.append((int(step), dict(metrics)))

    def write_summary(self, title: str, values: Mapping[str, Any], step: int | None = None) -> None:
        if jax.process_index() != 0:
            return
        width = max([len(str(k)) for k in values] + [6])
        lines = [f"== {title}" + (f" (step {step})" if step is not None else "") + " =="]
        lines += [f"  {str(k):<{width}}  {v}" for k, v in values.items()]
        print("\n".join(lines), flush=True)


def markdown_table(step: int, metrics: Mapping[str, float], chance: Mapping[str, float]) -> str:
    from clipjax.metrics import format_value

    lines = [f"# Evaluation at step {step}", "", "| metric | value | chance |", "|---|---|---|"]
    for key in sorted(metrics):
        ch = chance.get(key)
        lines.append(f"| {key} | {format_value(metrics[key])} | {format_value(ch) if ch is not None else ''} |")
    return "\n".join(lines) + "\n"


def _json_safe(d: Mapping[str, float]) -> dict[str, float | None]:
    return {k: (float(v) if v is not None and math.isfinite(float(v)) else None) for k, v in d.items()}


def evaluate_checkpoint(config, workdir: str, step: int | None = None) -> dict[str, float]:
    """Restores ``workdir``'s latest (or ``step``'s) params, runs every eval, writes eval_<step>.{json,md}."""
    from clipjax import checkpoint as ckpt_lib
    from clipjax import config as config_lib
    from clipjax.train_step import make_setup

    devices = jax.devices()
    config_lib.validate(config, len(devices))
    if not len(config.evals):
        raise ValueError("config.evals is empty: add entries with zeroshot_eval()/retrieval_eval() in the config file")
    m = config.mesh
    mesh = sharding.make_mesh({a: m[a] for a in sharding.MESH_AXES},
                              {a: m[f"dcn_{a}"] for a in sharding.MESH_AXES}, devices=devices)
    setup = make_setup(config, mesh)
    params, step = _restore_params(ckpt_lib, config, workdir, setup, step)
    return evaluate_params(config, setup, params, step, workdir)


def evaluate_params(config, setup, params, step: int, workdir: str | None = None) -> dict[str, float]:
    """Runs every eval on ``params``, prints the table and (with ``workdir``) writes eval_<step>.{json,md}."""
    evaluator = Evaluator(config, setup)
    metrics, chance = evaluator.run(params)
    report(step, _PrintWriter(), metrics, chance)
    if workdir is not None and jax.process_index() == 0:
        base = os.path.join(workdir, f"eval_{step}")
        payload = {"step": int(step), "metrics": _json_safe(metrics), "chance": _json_safe(chance),
                   "evals": {n: e.to_dict() for n, e in evaluator.entries.items()}}
        with open(base + ".json", "w") as f:
            json.dump(payload, f, indent=1, sort_keys=True)
        with open(base + ".md", "w") as f:
            f.write(markdown_table(step, metrics, chance))
        log.info("wrote %s.json and %s.md", base, base)
    return metrics


def _restore_params(ckpt_lib, config, workdir: str, setup, step: int | None):
    checkpointer = ckpt_lib.Checkpointer(workdir, every=config.checkpoint.every, keep=config.checkpoint.keep,
                                         async_save=False, config_json=config.to_json())
    try:
        step = checkpointer.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}")
        # Params only: evaluation needs no optimizer state (and converted checkpoints hold none).
        params = checkpointer.restore_params(step, setup.abstract_state.params)
    finally:
        close = getattr(checkpointer, "close", None)
        if close is not None:
            close()
    return params, int(step)
