"""Attention through ``jax.nn.dot_product_attention`` (XLA or cuDNN), and the masks it takes."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmret.models.options import AttentionImpl
from mmret.models.partitioning import constrain


def padding_mask(attention_mask: jax.Array, *, causal: bool, segment_ids: jax.Array | None = None) -> jax.Array:
    """[batch, 1, length, length] boolean mask from a [batch, length] padding mask.

    Pads (left or right) are never attended to. A pad query attends to itself alone, so its row is
    never empty (its output is ignored, but stays finite). ``segment_ids`` [batch, length] (packed rows,
    :mod:`mmret.data.packing`): a token attends only within its own segment.
    """
    valid = attention_mask.astype(bool)
    length = valid.shape[1]
    mask = valid[:, None, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    if causal:
        mask = mask & jnp.tril(jnp.ones((length, length), bool))[None, None]
    return mask | jnp.eye(length, dtype=bool)[None, None]


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[1, 1, n, n] block-diagonal mask: token i attends to j only within the same segment (image)."""
    return (segment_ids[:, None] == segment_ids[None, :])[None, None]


def segment_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, block: int = 0, impl: AttentionImpl = "xla"
) -> jax.Array:
    """Attention within segments of a flat sequence: q/k/v [n, heads, head_dim], segment_ids [n].

    ``block == 0``: one [n, n] block-diagonal mask (cost n^2). ``block > 0`` promises that every segment's
    tokens are contiguous and at most ``block`` long (an image's patches, ``block`` = the processor's patch
    cap per image): the sequence is cut into blocks of ``block`` tokens and each block attends to itself and
    its two neighbours, which hold every token of its segments, so the result is the same at a cost of
    n * 3 * block. Longer segments (batch padding rows) then see only their neighbourhood. The blocks are
    split over ``"vision_tokens"`` under the activation layout (:mod:`mmret.models.partitioning`).
    """
    n = q.shape[0]
    if block <= 0 or n <= 2 * block:
        return dot_product_attention(q[None], k[None], v[None], segment_mask(segment_ids), impl=impl)[0]
    nb = -(-n // block)
    pad = nb * block - n
    # Rows added to fill the last block get segment ids no real row has (-2: each other; -3: outside).
    seg = jnp.pad(segment_ids, (0, pad), constant_values=-2).reshape(nb, block)

    def blocks(x: jax.Array) -> jax.Array:
        return jnp.pad(x, ((0, pad), (0, 0), (0, 0))).reshape(nb, block, *x.shape[1:])

    def neighbours(x: jax.Array, fill: int | float) -> jax.Array:  # [nb, block, ...] -> [nb, 3 * block, ...]
        edge = jnp.full_like(x[:1], fill)
        prev, nxt = jnp.concatenate([edge, x[:-1]]), jnp.concatenate([x[1:], edge])
        return jnp.concatenate([prev, x, nxt], axis=1)

    def split(x: jax.Array) -> jax.Array:
        return constrain(x, "vision_tokens", *([None] * (x.ndim - 1)))

    qb = split(blocks(q))
    kb, vb = split(neighbours(blocks(k), 0)), split(neighbours(blocks(v), 0))
    seg_k = neighbours(seg, -3)
    mask = split((seg[:, :, None] == seg_k[:, None, :])[:, None])  # [nb, 1, block, 3 * block]
    out = split(dot_product_attention(qb, kb, vb, mask, impl=impl))
    return out.reshape(nb * block, *out.shape[2:])[:n]


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, impl: AttentionImpl = "xla"
) -> jax.Array:
    """q [B, T, N, H], k/v [B, S, K, H] with N a multiple of K (grouped-query attention)."""
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=q.shape[-1] ** -0.5, implementation=None if impl == "auto" else impl
    )
