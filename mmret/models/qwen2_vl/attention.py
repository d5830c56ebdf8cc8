"""Attention through ``jax.nn.dot_product_attention`` (XLA or cuDNN), and the masks it takes."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmret.models.qwen2_vl.config import AttentionImpl


def padding_mask(attention_mask: jax.Array, *, causal: bool) -> jax.Array:
    """[batch, 1, length, length] boolean mask from a [batch, length] padding mask.

    Pads (left or right) are never attended to. A pad query attends to itself alone, so its row is
    never empty (its output is ignored, but stays finite).
    """
    valid = attention_mask.astype(bool)
    length = valid.shape[1]
    mask = valid[:, None, None, :]
    if causal:
        mask = mask & jnp.tril(jnp.ones((length, length), bool))[None, None]
    return mask | jnp.eye(length, dtype=bool)[None, None]


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[1, 1, n, n] block-diagonal mask: token i attends to j only within the same segment (image)."""
    return (segment_ids[:, None] == segment_ids[None, :])[None, None]


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, impl: AttentionImpl = "xla"
) -> jax.Array:
    """q [B, T, N, H], k/v [B, S, K, H] with N a multiple of K (grouped-query attention)."""
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=q.shape[-1] ** -0.5, implementation=None if impl == "auto" else impl
    )
