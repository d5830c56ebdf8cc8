"""Position indices: M-RoPE (t, h, w) ids for the decoder and (h, w) ids for the ViT patches.

Written against an array namespace ``xp`` (numpy or jax.numpy) so the data pipeline computes them
on the host with numpy and the model computes them inside jit with the same code. Everything is
shape-static given ``input_ids`` and ``image_grid_thw``.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _exclusive_cumsum(xp: Any, x: Any, axis: int = -1) -> Any:
    return xp.cumsum(x, axis=axis) - x


def _cummax(xp: Any, x: Any, axis: int) -> Any:
    if xp is np:
        return np.maximum.accumulate(x, axis=axis)
    import jax

    return jax.lax.cummax(x, axis=axis)


def mrope_position_ids(
    input_ids: Any,
    attention_mask: Any,
    image_grid_thw: Any | None,
    *,
    image_token_id: int,
    spatial_merge_size: int = 2,
    xp: Any = np,
) -> Any:
    """The [3, batch, length] M-RoPE ids, as Hugging Face's ``get_rope_index`` computes them.

    Text tokens get equal (t, h, w) ids that grow by one per token. Each run of image tokens takes
    the grid (t, h/merge, w/merge) of the next image (images are numbered in row-major order across
    the batch) offset by the running position; the text after an image continues at
    start + max(h, w)/merge. Pad positions (attention_mask == 0) get 0 and do not advance.
    """
    input_ids = xp.asarray(input_ids)
    batch, length = input_ids.shape
    valid = xp.ones(input_ids.shape, dtype=bool) if attention_mask is None else xp.asarray(attention_mask) > 0
    text_ids = _exclusive_cumsum(xp, valid.astype(np.int32))
    if image_grid_thw is None or image_grid_thw.shape[0] == 0:
        pos = xp.where(valid, text_ids, 0)
        return xp.broadcast_to(pos[None], (3, batch, length))

    grid = xp.asarray(image_grid_thw).astype(np.int32)
    is_img = (input_ids == image_token_id) & valid
    prev = xp.concatenate([xp.zeros((batch, 1), dtype=bool), is_img[:, :-1]], axis=1)
    nxt = xp.concatenate([is_img[:, 1:], xp.zeros((batch, 1), dtype=bool)], axis=1)
    run_start = is_img & ~prev
    run_end = is_img & ~nxt
    # Image index of every image token, counting runs in row-major order over the whole batch.
    flat_start = run_start.reshape(-1).astype(np.int32)
    img_idx = (xp.cumsum(flat_start) - 1).reshape(batch, length)
    img_idx = xp.clip(img_idx, 0, grid.shape[0] - 1)
    gt = grid[:, 0][img_idx]
    gh = grid[:, 1][img_idx] // spatial_merge_size
    gw = grid[:, 2][img_idx] // spatial_merge_size
    # Offset of each image token inside its run.
    token_idx = xp.broadcast_to(xp.arange(length)[None], (batch, length))
    k = token_idx - _cummax(xp, xp.where(run_start, token_idx, 0), axis=1)
    # Every token advances the running position: text by one, an image run by max(h, w) at its end.
    advance = xp.where(is_img, xp.where(run_end, xp.maximum(gh, gw), 0), valid.astype(np.int32))
    start = _exclusive_cumsum(xp, advance)
    area = gh * gw
    t_idx = k // xp.maximum(area, 1)
    h_idx = (k // xp.maximum(gw, 1)) % xp.maximum(gh, 1)
    w_idx = k % xp.maximum(gw, 1)
    del gt  # a still image has t == 1; video would scale t_idx by its time interval.
    pos_t = xp.where(is_img, start + t_idx, start)
    pos_h = xp.where(is_img, start + h_idx, start)
    pos_w = xp.where(is_img, start + w_idx, start)
    pos = xp.stack([pos_t, pos_h, pos_w])
    return xp.where(valid[None], pos, 0)


def vision_patch_positions(image_grid_thw: Any, num_patches: int, spatial_merge_size: int = 2) -> Any:
    """For each of the ``num_patches`` ViT patches: (image index, h, w) in the merge-block order.

    The processor lays an image's patches out frame by frame, then by 2x2 merge blocks in row-major
    block order, then row-major inside a block; this recovers each patch's grid row and column.
    Rows beyond the patches the grids describe are padding: image index -1 (zero-size grid rows are
    allowed, so batches keep a static number of grid rows). Works inside jit (``image_grid_thw`` may
    be traced; ``num_patches`` is static).
    """
    import jax.numpy as jnp

    grid = jnp.asarray(image_grid_thw).astype(jnp.int32)
    sizes = grid[:, 0] * grid[:, 1] * grid[:, 2]
    offsets = jnp.cumsum(sizes) - sizes
    index = jnp.arange(num_patches)
    image = jnp.repeat(jnp.arange(grid.shape[0]), sizes, total_repeat_length=num_patches)
    image = jnp.where(index < sizes.sum(), image, -1)
    safe = jnp.maximum(image, 0)
    h, w = jnp.maximum(grid[safe, 1], 1), jnp.maximum(grid[safe, 2], 1)
    m = spatial_merge_size
    p = (index - offsets[safe]) % (h * w)
    block, inner = p // (m * m), p % (m * m)
    row = (block // jnp.maximum(w // m, 1)) * m + inner // m
    col = (block % jnp.maximum(w // m, 1)) * m + inner % m
    return image, row, col
