"""The Qwen2.5-VL vision tower: Qwen2-VL's patch embedding, attention and 2D RoPE, with RMSNorm, gated
SiLU MLPs, window attention in all blocks but ``fullatt_block_indexes``, and an RMSNorm merger.

Patches are put in window order once (:mod:`mmret.models.qwen2_5_vl.windows`) so that windows and
images are contiguous runs: window blocks attend within blocks of one window's patches, full blocks
within images (blocks of ``max_image_patches`` when set, else one block-diagonal mask); the merged
features go back to the processor's order at the end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmret.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from mmret.models.qwen2_5_vl.windows import restore_merged, window_order
from mmret.models.qwen2_vl.attention import segment_attention
from mmret.models.qwen2_vl.layer_stack import LayerStack
from mmret.models.qwen2_vl.layers import RMSNorm, activation, linear
from mmret.models.qwen2_vl.position_ids import vision_patch_positions
from mmret.models.qwen2_vl.rope import apply_rotary, vision_cos_sin
from mmret.models.qwen2_vl.vision import (
    PatchEmbed,
    PatchMerger,
    VisionAttention,
    check_patches,
    pad_rows,
    patch_layout,
    sharded_rows,
)

_EPS = 1e-6


class VisionMLP(nnx.Module):
    """down(act(gate(x)) * up(x)), every projection with a bias."""

    def __init__(self, cfg: Qwen2_5_VLConfig, *, rngs: nnx.Rngs):
        v = cfg.vision
        kw = dict(bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.act = activation(v.hidden_act)
        self.gate_proj = linear(v.embed_dim, v.mlp_dim, ("vision_embed", "vision_mlp"), **kw)
        self.up_proj = linear(v.embed_dim, v.mlp_dim, ("vision_embed", "vision_mlp"), **kw)
        self.down_proj = linear(v.mlp_dim, v.embed_dim, ("vision_mlp", "vision_embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class WindowAttention(VisionAttention):
    """Qwen2-VL's vision attention within segments of a given block size (windows or images)."""

    def __call__(  # type: ignore[override]
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment: jax.Array, block: int
    ) -> jax.Array:
        n = x.shape[0]
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(n, 3, self.num_heads, -1), 1, 0)
        q = apply_rotary(q.astype(jnp.float32), cos, sin).astype(x.dtype)
        k = apply_rotary(k.astype(jnp.float32), cos, sin).astype(x.dtype)
        return self.proj(segment_attention(q, k, v, segment, block=block, impl=self.impl).reshape(n, -1))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: Qwen2_5_VLConfig, *, rngs: nnx.Rngs):
        kw = dict(eps=_EPS, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.norm1 = RMSNorm(cfg.vision.embed_dim, **kw)
        self.attn = WindowAttention(cfg, rngs=rngs)
        self.norm2 = RMSNorm(cfg.vision.embed_dim, **kw)
        self.mlp = VisionMLP(cfg, rngs=rngs)
        self.image_block = cfg.max_image_patches
        self.window_block = cfg.vision.window_patches

    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, image: jax.Array, window: jax.Array, full: jax.Array
    ) -> jax.Array:
        """``full``: whether this block attends within images (else within windows); a traced scalar under
        scan (both branches are compiled, one runs)."""
        h = self.norm1(x)

        def whole_images(h: jax.Array) -> jax.Array:
            return self.attn(h, cos, sin, image, self.image_block)

        def windows(h: jax.Array) -> jax.Array:
            return self.attn(h, cos, sin, window, self.window_block)

        if isinstance(full, jax.core.Tracer):
            a = jax.lax.cond(full, whole_images, windows, h)
        else:
            a = whole_images(h) if bool(full) else windows(h)
        x = x + a
        return patch_layout(x + self.mlp(self.norm2(x)))


class RMSPatchMerger(PatchMerger):
    """Qwen2-VL's merger with an RMSNorm (no bias) before it."""

    def __init__(self, cfg: Qwen2_5_VLConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.ln_q = RMSNorm(cfg.vision.embed_dim, eps=_EPS, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


class VisionTransformer(nnx.Module):
    """pixel_values [patches, patch_dim] and image_grid_thw [images, 3] -> merged features
    [patches / merge^2, LLM width] in the processor's order, as Qwen2-VL's tower (padding rows and filler
    grid rows included)."""

    def __init__(self, cfg: Qwen2_5_VLConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg.vision
        self.dtype = cfg.dtype
        self.max_image_patches = cfg.max_image_patches
        self.patch_embed = PatchEmbed(cfg, rngs=rngs)
        self.blocks = LayerStack(
            lambda r: VisionBlock(cfg, rngs=r), cfg.vision.depth, scan=cfg.scan_layers, remat=cfg.remat, rngs=rngs
        )
        self.merger = RMSPatchMerger(cfg, rngs=rngs)
        # Which blocks attend within whole images (static, not a parameter).
        self.full = tuple(i in cfg.vision.fullatt_block_indexes for i in range(cfg.vision.depth))

    def __call__(
        self, pixel_values: jax.Array, image_grid_thw: jax.Array, image_mask: jax.Array | None = None
    ) -> jax.Array:
        v = self.cfg
        check_patches(pixel_values, image_grid_thw, image_mask, v.patch_dim, self.max_image_patches)
        n = pixel_values.shape[0]
        m = v.spatial_merge_size
        if n % (m * m):
            raise ValueError(f"pixel_values has {n} patches, not a multiple of {m * m} (the patch merger)")
        padded = sharded_rows(n, m, self.max_image_patches, v.window_patches)
        positions = vision_patch_positions(image_grid_thw, padded, m)
        order, image, window = window_order(image_grid_thw, positions, m, v.window)
        image, window = patch_layout(image), patch_layout(window)
        cos, sin = map(patch_layout, vision_cos_sin(positions[1][order], positions[2][order], v.head_dim, v.rope_theta))
        x = patch_layout(self.patch_embed(pad_rows(pixel_values, padded).astype(self.dtype))[order])
        x = self.blocks(x, cos, sin, image, window, per_layer=np.asarray(self.full))
        return restore_merged(self.merger(x), order, m)[: n // (m * m)]
