"""The bi-encoder's train step: embed queries and candidates, InfoNCE over the global batch, update.

Functional around NNX (``nnx.split`` / ``nnx.merge`` around a jitted step, as the Flax Gemma example does);
with GradCache (chunked batches: a leading chunk axis on every query / candidate array) the gradient is
taken with :mod:`mmret.grad_cache`, equal to the plain step. Imports only jax, flax, optax and mmret's model
and loss layers, so benchmarks and accelerator images without the data stack can build it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mmret.grad_cache import grad_cache_value_and_grad
from mmret.losses import info_nce
from mmret.models.retriever import Retriever
from mmret.tasks.base import StepFn, TrainState, apply_gradients


@dataclasses.dataclass(frozen=True)
class StepConfig:
    symmetric: bool = False  # add the candidate->query term (U-MARVEL's caption stage)
    symmetric_reduction: str = "mean"  # "mean" of the two directions, or U-MARVEL's "sum"
    # Leave a query's other labelled positives in the batch out of its denominator (mmret's default);
    # U-MARVEL's loss has no such masking (every other in-batch candidate is a negative).
    mask_false_negatives: bool = True
    grad_cache: bool = False  # the batch is chunked; take the gradient with GradCache


def _positive_index(batch_size: int, num_candidates: int) -> jax.Array:
    """Candidates are grouped per query, positive first: query b's target is b * (C / B)."""
    return jnp.arange(batch_size) * (num_candidates // batch_size)


def embeddings_loss(
    q: jax.Array, c: jax.Array, positive_mask: jax.Array, temperature: jax.Array, cfg: StepConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    return info_nce(
        q,
        c,
        positive_index=_positive_index(q.shape[0], c.shape[0]),
        positive_mask=positive_mask if cfg.mask_false_negatives else None,
        temperature=temperature,
        symmetric=cfg.symmetric,
        symmetric_reduction=cfg.symmetric_reduction,
    )


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: StepConfig = StepConfig()) -> StepFn:
    """``step(state, batch) -> (state, metrics)`` on a batch whose ``positive_mask`` is 2-D [queries,
    candidates]; jit it with the shardings you want (and donate state)."""

    def merge(params: nnx.State, rest: nnx.State) -> Retriever:
        return nnx.merge(graphdef, params, rest)

    def plain(params: nnx.State, rest: nnx.State, batch: dict[str, Any]):
        def loss_fn(p):
            model = merge(p, rest)
            q, c = model.encoder(batch["query"]), model.encoder(batch["candidates"])
            return embeddings_loss(q, c, batch["positive_mask"], model.temperature(), cfg)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def grad_cache(params: nnx.State, rest: nnx.State, batch: dict[str, Any]):
        def embed(p, chunk):
            return merge(p, rest).encoder(chunk)

        def loss_fn(q, c, p):  # the loss's own parameters (the temperature) are read from p
            return embeddings_loss(q, c, batch["positive_mask"], merge(p, rest).temperature(), cfg)

        (loss, metrics), (grads, g_extra) = grad_cache_value_and_grad(
            embed, loss_fn, params, batch["query"], batch["candidates"], params
        )
        return (loss, metrics), jax.tree.map(jnp.add, grads, g_extra)

    value_and_grad = grad_cache if cfg.grad_cache else plain

    def step(state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
        (loss, metrics), grads = value_and_grad(state.params, state.rest, batch)
        return apply_gradients(state, grads, tx, loss, metrics)

    return step
