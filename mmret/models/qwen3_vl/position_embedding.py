"""Qwen3-VL's learned absolute position embeddings: a square table resampled to each image's patch grid.

Hugging Face resamples the ``side x side`` table to an image's ``h x w`` patches bilinearly with aligned
corners (``get_vision_interpolation_indices_and_weights``): patch row r reads table rows
``r * (side - 1) / (h - 1)`` (floor and floor + 1, clamped), columns likewise, with hat-kernel weights; the four
taps are summed. :func:`interpolation_taps` computes the same taps and weights inside jit from the patch
positions the processor's layout gives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _axis_taps(index: jax.Array, size: jax.Array, side: int) -> tuple[jax.Array, jax.Array]:
    src = index.astype(jnp.float32) * (side - 1) / jnp.maximum(size - 1, 1).astype(jnp.float32)
    floor = jnp.floor(src)
    offsets = jnp.arange(2)
    taps = jnp.clip(floor.astype(jnp.int32)[:, None] + offsets, 0, side - 1)
    weights = jnp.maximum(1 - jnp.abs(src[:, None] - floor[:, None] - offsets), 0)
    return taps, weights


def interpolation_taps(
    image_grid_thw: jax.Array, positions: tuple[jax.Array, jax.Array, jax.Array], side: int
) -> tuple[jax.Array, jax.Array]:
    """``(indices, weights)`` [patches, 4]: the table rows each patch sums and their weights. ``positions``:
    (image, row, col) per patch (:func:`~mmret.models.qwen2_vl.position_ids.vision_patch_positions`)."""
    grid = jnp.asarray(image_grid_thw).astype(jnp.int32)
    image, row, col = positions
    safe = jnp.maximum(image, 0)
    h_taps, h_weights = _axis_taps(row, grid[safe, 1], side)
    w_taps, w_weights = _axis_taps(col, grid[safe, 2], side)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return indices, weights
