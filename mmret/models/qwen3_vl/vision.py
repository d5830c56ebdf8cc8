"""The Qwen3-VL vision tower: Qwen2-VL's blocks (LayerNorm, 2D RoPE, per-image attention) with a biased patch
embedding, interpolated learned position embeddings, and DeepStack: the hidden states after each of
``deepstack_visual_indexes``' blocks pass their own merger (LayerNorm after the 2x2 shuffle) and become
features the decoder adds at the image tokens of its first layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mmret.models.partitioning import logical
from mmret.models.qwen2_vl.layer_stack import LayerStack
from mmret.models.qwen2_vl.layers import INIT_STD, layer_norm
from mmret.models.qwen2_vl.position_ids import vision_patch_positions
from mmret.models.qwen2_vl.rope import vision_cos_sin
from mmret.models.qwen2_vl.vision import (
    PatchEmbed,
    PatchMerger,
    VisionBlock,
    check_patches,
    pad_rows,
    patch_layout,
    sharded_rows,
)
from mmret.models.qwen3_vl.config import Qwen3VLConfig
from mmret.models.qwen3_vl.position_embedding import interpolation_taps

_EPS = 1e-6


class DeepStackMerger(PatchMerger):
    """The merger with its LayerNorm over the concatenated 2x2 group (after the shuffle)."""

    def __init__(self, cfg: Qwen3VLConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.ln_q = layer_norm(self.merged_dim, eps=_EPS, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = patch_layout(self.ln_q(x.reshape(-1, self.merged_dim)))
        return patch_layout(self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False)))


class VisionTransformer(nnx.Module):
    """pixel_values [patches, patch_dim] and image_grid_thw [images, 3] -> merged features
    [patches / merge^2, LLM width] (``__call__``), or those and the DeepStack features
    [len(deepstack_visual_indexes), patches / merge^2, LLM width] (:meth:`with_deepstack`); images in order,
    padding rows and filler grid rows as in Qwen2-VL's tower."""

    def __init__(self, cfg: Qwen3VLConfig, *, rngs: nnx.Rngs):
        v = cfg.vision
        self.cfg = v
        self.dtype = cfg.dtype
        self.max_image_patches = cfg.max_image_patches
        self.patch_embed = PatchEmbed(cfg, rngs=rngs, bias=True)
        self.pos_embed = nnx.Embed(
            v.num_position_embeddings,
            v.embed_dim,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=logical(nnx.initializers.normal(INIT_STD), "vision_positions", "vision_embed"),
            rngs=rngs,
        )
        self.blocks = LayerStack(
            lambda r: VisionBlock(cfg, rngs=r), v.depth, scan=cfg.scan_layers, remat=cfg.remat, rngs=rngs
        )
        self.merger = PatchMerger(cfg, rngs=rngs)
        self.deepstack_merger_list = (
            LayerStack(
                lambda r: DeepStackMerger(cfg, rngs=r),
                len(v.deepstack_visual_indexes),
                scan=cfg.scan_layers,
                remat="none",
                rngs=rngs,
            )
            if v.deepstack_visual_indexes
            else None
        )

    def __call__(
        self, pixel_values: jax.Array, image_grid_thw: jax.Array, image_mask: jax.Array | None = None
    ) -> jax.Array:
        return self.with_deepstack(pixel_values, image_grid_thw, image_mask, deepstack=False)[0]

    def with_deepstack(
        self,
        pixel_values: jax.Array,
        image_grid_thw: jax.Array,
        image_mask: jax.Array | None = None,
        *,
        deepstack: bool = True,
    ) -> tuple[jax.Array, jax.Array | None]:
        """``(features, deepstack_features)``; ``deepstack=False`` stops after the last block the main merger
        needs and returns None for the second."""
        v = self.cfg
        check_patches(pixel_values, image_grid_thw, image_mask, v.patch_dim, self.max_image_patches)
        n = pixel_values.shape[0]
        padded = sharded_rows(n, v.spatial_merge_size, self.max_image_patches)
        positions = vision_patch_positions(image_grid_thw, padded, v.spatial_merge_size)
        image, rows, cols = map(patch_layout, positions)
        cos, sin = map(patch_layout, vision_cos_sin(rows, cols, v.head_dim, v.rope_theta))
        indices, weights = map(patch_layout, interpolation_taps(image_grid_thw, positions, v.grid_side))
        x = self.patch_embed(pad_rows(pixel_values, padded).astype(self.dtype))
        table = self.pos_embed.embedding[...]
        x = patch_layout(x + (table[indices] * weights[..., None].astype(table.dtype)).sum(1).astype(x.dtype))
        deep = []
        start = 0
        for j, index in enumerate(v.deepstack_visual_indexes if deepstack else ()):
            x = self.blocks(x, cos, sin, image, start=start, stop=index + 1)
            deep.append(self.deepstack_merger_list.block(j)(x))
            start = index + 1
        x = self.blocks(x, cos, sin, image, start=start)
        merged = n // v.spatial_merge_size**2
        return self.merger(x)[:merged], (jnp.stack(deep)[:, :merged] if deep else None)
