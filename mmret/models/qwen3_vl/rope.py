"""Qwen3-VL's interleaved M-RoPE: the (t, h, w) ids rotate interleaved frequencies, not contiguous sections."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmret.models.qwen2_vl.rope import inverse_frequencies


def interleaved_axes(half_dim: int, mrope_section: Sequence[int]) -> np.ndarray:
    """For each of the ``half_dim`` frequencies, the position id (0 t, 1 h, 2 w) it rotates with: frequency j
    follows h when j % 3 == 1 and j < 3 * sections[1], w when j % 3 == 2 and j < 3 * sections[2], else t."""
    j = np.arange(half_dim)
    axis = np.zeros(half_dim, np.int32)
    axis[(j % 3 == 1) & (j < 3 * mrope_section[1])] = 1
    axis[(j % 3 == 2) & (j < 3 * mrope_section[2])] = 2
    return axis


def interleaved_mrope_cos_sin(
    position_ids: jax.Array, head_dim: int, theta: float, mrope_section: Sequence[int]
) -> tuple[jax.Array, jax.Array]:
    """cos/sin [batch, length, head_dim] from M-RoPE ids [3, batch, length] (rotate-half layout)."""
    inv_freq = inverse_frequencies(head_dim, theta)
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, B, L, head_dim/2]
    axis = interleaved_axes(head_dim // 2, mrope_section)
    freqs = jnp.where(axis == 0, freqs[0], jnp.where(axis == 1, freqs[1], freqs[2]))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)
