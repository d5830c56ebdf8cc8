"""The pointwise reranker: the backbone with its LM head reads a (query, candidate) pair as one causal sequence
(:mod:`mmret.data.rerank_pairs`) and answers yes or no.

``score`` is P(yes): the softmax over the two answer tokens' logits at the first answer position (U-MARVEL's
``eval_mbeir_rerank_pointwise.py``: ``softmax([logit(Yes), logit(No)])[0]`` of the first generated token's
scores). ``target_logits`` gives the full-vocabulary logits at the trained target positions only (the LM loss
of :mod:`mmret.tasks.reranker`), so no [batch, length, vocab] array is ever built.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mmret.models.encoder import forward
from mmret.models.interface import BackboneModel


def gather_positions(hidden: jax.Array, positions: jax.Array, slot: jax.Array | None = None) -> jax.Array:
    """``hidden`` [B, L, D] at ``positions`` [B, K] -> [B, K, D]. Packed rows (``slot`` given): ``hidden``
    [R, L, D] at the columns ``positions`` [R, S, K] of each row's segments, then per example -> [B, K, D]."""
    if slot is None:
        return jnp.take_along_axis(hidden, positions[..., None].astype(jnp.int32), axis=1)
    r, s, k = positions.shape
    picked = jnp.take_along_axis(hidden, positions.reshape(r, s * k, 1).astype(jnp.int32), axis=1)
    return picked.reshape(r * s, k, hidden.shape[-1])[slot]


def yes_probability(logits: jax.Array, yes_id: int, no_id: int) -> jax.Array:
    """P(yes) [B] from logits [B, V]: the softmax over the two answers' logits, in float32."""
    pair = jnp.stack([logits[:, yes_id], logits[:, no_id]], axis=-1).astype(jnp.float32)
    return jax.nn.softmax(pair, axis=-1)[:, 0]


class Reranker(nnx.Module):
    """``backbone`` (built with its LM head) as a causal yes/no reranker."""

    def __init__(self, backbone: BackboneModel):
        self.backbone = backbone

    def hidden(self, batch: dict[str, Any]) -> jax.Array:
        """The final hidden states [B, L, D] of a collated pair batch (causal attention)."""
        return forward(self.backbone, batch, causal=True).last_hidden_state

    def logits_at(self, batch: dict[str, Any], positions: jax.Array) -> jax.Array:
        """Full-vocabulary logits [B, K, V] at ``positions`` [B, K] (packed rows: [R, S, K]) (float32)."""
        picked = gather_positions(self.hidden(batch), positions, batch.get("slot"))
        return self.backbone.logits(picked).astype(jnp.float32)

    def answer_logits(self, batch: dict[str, Any]) -> jax.Array:
        """Logits [B, V] at each pair's ``answer_index`` (the first answer token's)."""
        return self.logits_at(batch, batch["answer_index"][..., None])[:, 0]

    def score(self, batch: dict[str, Any], yes_id: int, no_id: int) -> jax.Array:
        """P(yes) [B] of each pair."""
        return yes_probability(self.answer_logits(batch), yes_id, no_id)

    def target_logits(self, batch: dict[str, Any]) -> jax.Array:
        """Logits [B, T, V] at the training form's ``target_positions``."""
        return self.logits_at(batch, batch["target_positions"])
