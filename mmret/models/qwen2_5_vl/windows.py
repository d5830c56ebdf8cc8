"""Qwen2.5-VL's window attention layout: the order that makes each window's patches contiguous.

The vision tower attends within windows of ``window x window`` merged tokens (2x2 patch groups) in most
layers and within whole images in the others. Hugging Face reorders the merged tokens window by window
(``get_vision_window_index``: per image and frame, windows in row-major order over the grid padded to
whole windows, tokens row-major inside a window), runs the blocks, and restores the order after the
merger. :func:`window_order` computes the same order from ``image_grid_thw`` inside jit, as a patch
permutation plus each patch's window id, so the blocks can use block-local attention
(:func:`mmret.models.qwen2_vl.attention.segment_attention`) on contiguous windows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def window_order(
    image_grid_thw: jax.Array, positions: tuple[jax.Array, jax.Array, jax.Array], spatial_merge_size: int, window: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(order, image, window_id)`` for patch rows laid out as the processor lays them, given their
    ``positions`` (image, row, col) from :func:`~mmret.models.qwen2_vl.position_ids.vision_patch_positions`.

    ``order`` [n]: patch indices in window order (``x[order]`` is the reordered sequence; merge groups stay
    whole and in their own order). ``image`` [n]: the image of each reordered patch (-1: padding rows, which
    come last). ``window_id`` [n]: a segment id per (image, frame, window), increasing along the reordered
    sequence (padding rows share one). ``window``: merged tokens per window side.
    """
    m = spatial_merge_size
    grid = jnp.asarray(image_grid_thw).astype(jnp.int32)
    image, row, col = positions
    num_patches = image.shape[0]
    sizes = grid[:, 0] * grid[:, 1] * grid[:, 2]
    offsets = jnp.cumsum(sizes) - sizes
    index = jnp.arange(num_patches)
    safe = jnp.maximum(image, 0)
    frame = (index - offsets[safe]) // jnp.maximum(grid[safe, 1] * grid[safe, 2], 1)
    mr, mc = row // m, col // m  # merged-token row and column
    pad = image < 0
    keys = [jnp.where(pad, grid.shape[0], image), frame, mr // window, mc // window, mr % window, mc % window]
    keys = [jnp.where(pad, 0, k) if i else k for i, k in enumerate(keys)]
    # jnp.lexsort: the last key is the primary one; the patch index last breaks every tie (merge groups stay
    # in processor order).
    order = jnp.lexsort((index, *reversed(keys)))
    sorted_keys = [k[order] for k in keys[:4]]
    new = jnp.zeros(num_patches, bool).at[0].set(True)  # a window starts where image, frame or window changes
    for k in sorted_keys:
        new = new.at[1:].set(new[1:] | (k[1:] != k[:-1]))
    window_id = jnp.cumsum(new) - 1
    return order, image[order], window_id


def restore_merged(merged: jax.Array, order: jax.Array, spatial_merge_size: int) -> jax.Array:
    """The merger's output [n / merge^2, d] in window order -> the processor's order."""
    unit = order[:: spatial_merge_size**2] // spatial_merge_size**2  # the merged token each output row is
    return jnp.zeros_like(merged).at[unit].set(merged)
