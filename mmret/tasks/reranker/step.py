"""The reranker's train step: the causal LM loss on the trained targets of every pair, mean over all of the
global batch's targets (Hugging Face's ``CrossEntropyLoss`` over the unmasked labels, U-MARVEL's loss), plus
the answer accuracy (P(yes) > 0.5 on a positive pair, < 0.5 on a negative one). Imports only jax, flax, optax
and mmret's model layer, as the bi-encoder's step."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mmret.models.reranker import Reranker, gather_positions, yes_probability
from mmret.tasks.base import StepFn, TrainState, apply_gradients


def lm_loss(logits: jax.Array, target_ids: jax.Array, target_mask: jax.Array) -> jax.Array:
    """Mean negative log-likelihood [scalar] of ``target_ids`` [N, T] under ``logits`` [N, T, V] over the
    targets where ``target_mask`` is 1 (float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, target_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = target_mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def reranker_loss(model: Reranker, batch: dict[str, Any], yes_id: int, no_id: int) -> tuple[jax.Array, dict]:
    """(loss, metrics) of a collated batch of training pairs (:func:`mmret.tasks.reranker.data.collate_rerank`)."""
    hidden = model.hidden(batch)
    positions = jnp.concatenate([batch["target_positions"], batch["answer_index"][..., None]], axis=-1)
    logits = model.backbone.logits(gather_positions(hidden, positions, batch.get("slot"))).astype(jnp.float32)
    loss = lm_loss(logits[:, :-1], batch["target_ids"], batch["target_mask"])
    p_yes = yes_probability(logits[:, -1], yes_id, no_id)
    accuracy = jnp.mean(((p_yes > 0.5).astype(jnp.int32) == batch["labels"]).astype(jnp.float32))
    return loss, {"accuracy": accuracy, "p_yes_positive": _mean_where(p_yes, batch["labels"] == 1)}


def _mean_where(x: jax.Array, where: jax.Array) -> jax.Array:
    w = where.astype(jnp.float32)
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, yes_id: int, no_id: int) -> StepFn:
    """``step(state, batch) -> (state, metrics)``; jit it with the shardings you want (and donate state)."""

    def step(state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
        def loss_fn(p):
            return reranker_loss(nnx.merge(graphdef, p, state.rest), batch, yes_id, no_id)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return apply_gradients(state, grads, tx, loss, metrics)

    return step
