"""The LocCa decoder's loss beside the contrastive one: inputs, parallel prediction, per-task NLL.

The pipeline writes each example's sequence (``data.locca``): ``dec_ids`` and which
of its ids are targets (``dec_target``). Here, per step:

- the decoder reads ``dec_ids[:, :-1]`` and predicts ``dec_ids[:, 1:]`` where those are targets;
- a ``parallel_fraction`` of the examples (CapPa) see the mask token in place of
  every target id and attend both ways, so each target is predicted at once from
  the image and the prefix; the others attend causally;
- the loss is the mean NLL over the global batch's target tokens, computed a
  vocabulary chunk at a time (``vocab_loss``), times ``loss.decoder.weight``.

Which examples predict in parallel is ``fold_in(seed, step)``: a resumed run draws the same.
Dimension letters: B batch, L sequence ids, T decoder inputs (L - 1), P image tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from clipjax import sharding, vocab_loss
from clipjax.data.locca import NUM_SPECIAL, TASKS

_PARALLEL_STREAM = 2  # fold_in tag of the parallel-prediction draws (1: patch masks)


def decoder_inputs(ids_BL: jax.Array, target_BL: jax.Array, parallel_B: jax.Array, mask_id: int) -> dict[str, jax.Array]:
    """The decoder's ``inputs_BT``, ``targets_BT``, ``weights_BT`` (1 on target tokens) and ``mask_BTT``.

    ``mask_BTT[b, t, s]``: input t may attend to input s. Keys that are padding are
    never seen; a causal row sees keys up to its own position, a parallel row sees
    all of its keys but every target id in its inputs is ``mask_id``.
    """
    inputs_BT, targets_BT = ids_BL[:, :-1], ids_BL[:, 1:]
    valid_BT = inputs_BT != 0
    inputs_BT = jnp.where(parallel_B[:, None] & target_BL[:, :-1], mask_id, inputs_BT)
    t = inputs_BT.shape[1]
    causal_TT = jnp.tril(jnp.ones((t, t), bool))
    mask_BTT = (causal_TT[None] | parallel_B[:, None, None]) & valid_BT[:, None, :]
    return {"inputs": inputs_BT, "targets": targets_BT, "weights": target_BL[:, 1:].astype(jnp.float32),
            "mask": mask_BTT, "task": ids_BL[:, 0]}


@dataclasses.dataclass(frozen=True)
class DecoderLoss:
    """The decoder objective of a run (``from_config``: None when the decoder is off)."""

    weight: float
    parallel_fraction: float
    vocab_chunk: int
    first_task_id: int  # the cap task token; aref and gcap follow, then the mask token
    seed: int

    @classmethod
    def from_config(cls, config) -> "DecoderLoss | None":
        if not config.model.decoder.enabled:
            return None
        d = config.loss.decoder
        first = config.model.decoder.vocab_size - NUM_SPECIAL
        return cls(weight=d.weight, parallel_fraction=d.parallel_fraction, vocab_chunk=d.vocab_chunk,
                   first_task_id=first, seed=config.seed)

    def prepare(self, batch: dict[str, jax.Array], step: jax.Array) -> dict[str, jax.Array]:
        """A global batch's decoder inputs (``decoder_inputs``) with this step's parallel rows."""
        b = batch["dec_ids"].shape[0]
        rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), _PARALLEL_STREAM), step)
        parallel_B = jax.random.bernoulli(rng, self.parallel_fraction, (b,))
        parallel_B = jax.lax.with_sharding_constraint(parallel_B, P(sharding.BATCH_AXES))
        return decoder_inputs(batch["dec_ids"], batch["dec_target"], parallel_B, self.first_task_id + len(TASKS))

    def nll_sums(self, decode, tokens_BPD: jax.Array, prep: dict[str, jax.Array]) -> jax.Array:
        """float32 ``[len(TASKS)]``: summed target NLL of each task's examples.

        ``decode(inputs_BT, tokens_BPD, mask_BTT) -> (h_BTD, w_DV)`` runs the decoder.
        """
        h_BTD, w_DV = decode(prep["inputs"], tokens_BPD, prep["mask"])
        nll_BT = vocab_loss.sequence_nll(h_BTD, w_DV, prep["targets"], self.vocab_chunk) * prep["weights"]
        return jnp.einsum("b,bk->k", jnp.sum(nll_BT, axis=1), self._task_onehot(prep))

    def _task_onehot(self, prep: dict[str, jax.Array]) -> jax.Array:
        return jax.nn.one_hot(prep["task"] - self.first_task_id, len(TASKS), dtype=jnp.float32)

    def loss(self, nll_K: jax.Array, prep: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, Any]]:
        """``(weight x mean target NLL, metrics)`` from ``nll_sums`` of the whole global batch."""
        count_K = jnp.einsum("b,bk->k", jnp.sum(prep["weights"], axis=1), self._task_onehot(prep))
        mean = jnp.sum(nll_K) / jnp.maximum(jnp.sum(count_K), 1.0)
        metrics = {"decoder_loss": mean}
        for k, task in enumerate(TASKS):  # null when the batch held no example of the task
            metrics[f"decoder_{task}_loss"] = jnp.where(count_K[k] > 0, nll_K[k] / jnp.maximum(count_K[k], 1.0),
                                                        jnp.nan)
        return self.weight * mean, metrics
