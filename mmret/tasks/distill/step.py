"""The distillation's train step: the retriever's cosine over each query's teacher list against the teacher's
fused scores (:func:`mmret.losses.listwise_distillation`, U-MARVEL's halving and detached teacher temperature),
optionally plus InfoNCE over the global batch's candidates. Imports only jax, flax, optax and mmret's model and
loss layers, as the bi-encoder's step."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mmret.losses import info_nce, listwise_distillation
from mmret.models.retriever import Retriever
from mmret.tasks.base import StepFn, TrainState, apply_gradients


@dataclasses.dataclass(frozen=True)
class DistillStepConfig:
    teacher_scale: float = 0.5  # U-MARVEL's "fused / 2"
    log_eps: float = 1e-8  # U-MARVEL's log(q + 1e-8)
    infonce_weight: float = 0.0  # > 0: the candidates lead with each query's positive (mmret.tasks.distill.data)
    mask_false_negatives: bool = True  # the InfoNCE term's masking (as the bi-encoder's)


def distill_loss(
    q: jax.Array, c: jax.Array, batch: dict[str, Any], temperature: jax.Array, cfg: DistillStepConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) from query embeddings ``q`` [B, D] and candidate embeddings ``c`` [B * L, D] grouped per
    query (L = top_k, or 1 + top_k with the positive first)."""
    b, k = batch["teacher"].shape
    per = c.shape[0] // b
    lists = c.reshape(b, per, -1)[:, per - k :]  # the teacher list (after the positive, if any)
    cosine = jnp.einsum("bd,bkd->bk", q.astype(jnp.float32), lists.astype(jnp.float32))
    mask = batch["list_mask"]
    kl = listwise_distillation(
        cosine, batch["teacher"], tau=temperature, mask=mask, teacher_scale=cfg.teacher_scale, eps=cfg.log_eps
    )
    masked = jnp.where(mask, cosine, -jnp.inf), jnp.where(mask, batch["teacher"], -jnp.inf)
    top1 = jnp.mean((jnp.argmax(masked[0], -1) == jnp.argmax(masked[1], -1)).astype(jnp.float32))
    metrics = {"kl": kl, "top1_agreement": top1}
    loss = kl
    if cfg.infonce_weight > 0:
        nce, m = info_nce(
            q,
            c,
            positive_index=jnp.arange(b) * per,
            positive_mask=batch["positive_mask"] if cfg.mask_false_negatives else None,
            temperature=temperature,
        )
        loss = loss + cfg.infonce_weight * nce
        metrics |= {"infonce": nce, "accuracy": m["accuracy"]}
    return loss, metrics


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: DistillStepConfig) -> StepFn:
    """``step(state, batch) -> (state, metrics)`` on a batch whose ``positive_mask`` is 2-D; jit it with the
    shardings you want (and donate state)."""

    def step(state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
        def loss_fn(p):
            model: Retriever = nnx.merge(graphdef, p, state.rest)
            q, c = model.encoder(batch["query"]), model.encoder(batch["candidates"])
            return distill_loss(q, c, batch, model.temperature(), cfg)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return apply_gradients(state, grads, tx, loss, metrics)

    return step
