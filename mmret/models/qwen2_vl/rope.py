"""Rotary embeddings: M-RoPE for the decoder, axial 2D RoPE for the vision tower."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` [..., heads, head_dim] by angles broadcast from cos/sin [..., head_dim]."""
    cos, sin = cos[..., None, :], sin[..., None, :]
    return x * cos + rotate_half(x) * sin


def inverse_frequencies(dim: int, theta: float) -> jax.Array:
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def mrope_cos_sin(
    position_ids: jax.Array, head_dim: int, theta: float, mrope_section: Sequence[int]
) -> tuple[jax.Array, jax.Array]:
    """cos/sin [batch, length, head_dim] from M-RoPE ids [3, batch, length].

    The head_dim/2 frequencies are split into sections (t, h, w); section i rotates with the i-th
    position id. The halves are then repeated, as in rotate-half RoPE.
    """
    inv_freq = inverse_frequencies(head_dim, theta)
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, B, L, head_dim/2]
    bounds = [0, *itertools.accumulate(mrope_section)]
    freqs = jnp.concatenate([freqs[i % 3, ..., a:b] for i, (a, b) in enumerate(itertools.pairwise(bounds))], -1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def vision_cos_sin(rows: jax.Array, cols: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin [patches, head_dim] for the ViT's axial 2D RoPE: half the rotary dims follow the patch
    row, half its column."""
    inv_freq = inverse_frequencies(head_dim // 2, theta)
    fh = rows.astype(jnp.float32)[:, None] * inv_freq
    fw = cols.astype(jnp.float32)[:, None] * inv_freq
    freqs = jnp.concatenate([fh, fw], axis=-1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)
