"""The Qwen2-VL vision tower: patch embedding, ViT blocks with 2D RoPE and per-image (block-diagonal)
attention, QuickGELU MLPs, and the 2x2 patch merger that projects to the LLM width."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmret.models.partitioning import constrain, shards
from mmret.models.qwen2_vl.attention import segment_attention
from mmret.models.qwen2_vl.config import Qwen2VLConfig
from mmret.models.qwen2_vl.layer_stack import LayerStack
from mmret.models.qwen2_vl.layers import activation, layer_norm, linear
from mmret.models.qwen2_vl.position_ids import vision_patch_positions
from mmret.models.qwen2_vl.rope import apply_rotary, vision_cos_sin

_LN_EPS = 1e-6


def check_patches(
    pixel_values: jax.Array, image_grid_thw: jax.Array, image_mask: jax.Array | None, patch_dim: int, block: int
) -> None:
    """A ``ValueError`` when ``pixel_values`` is not [patches, ``patch_dim``], the grids describe more patches
    than it has, or (concrete grids) an image (a grid row ``image_mask`` marks) has more than ``block`` > 0."""
    if pixel_values.ndim != 2 or pixel_values.shape[1] != patch_dim:
        raise ValueError(f"pixel_values must be [patches, {patch_dim}], got {pixel_values.shape}")
    n = pixel_values.shape[0]
    if any(isinstance(x, jax.core.Tracer) for x in (image_grid_thw, image_mask)):
        return
    sizes = np.prod(np.asarray(image_grid_thw), axis=-1)
    if int(sizes.sum()) > n:
        raise ValueError(f"pixel_values has {n} patches, image_grid_thw describes {int(sizes.sum())}")
    real = sizes if image_mask is None else sizes[np.asarray(image_mask) > 0]
    if block and real.size and int(real.max()) > block:
        raise ValueError(f"an image has {int(real.max())} patches, more than max_image_patches={block}")


def sharded_rows(n: int, merge: int, *blocks: int) -> int:
    """The patch rows a vision tower computes on: ``n`` when the activation layout does not split
    ``"vision_tokens"``; split S ways, ``n`` rounded up so that every shard holds whole attention blocks of
    each of ``blocks`` rows (those > 0) and whole ``merge`` x ``merge`` groups. The added rows are padding
    (image -1), which no real patch attends to."""
    s = shards("vision_tokens")
    if s == 1:
        return n
    unit = s * math.lcm(merge * merge, *(b for b in blocks if b > 0))
    return -(-n // unit) * unit


def pad_rows(x: jax.Array, rows: int) -> jax.Array:
    """``x`` [n, ...] with zero rows appended up to ``rows``."""
    return x if rows == x.shape[0] else jnp.pad(x, ((0, rows - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))


def patch_layout(x: jax.Array) -> jax.Array:
    """A per-patch array ([patches, ...]) split over ``"vision_tokens"`` under the activation layout."""
    return constrain(x, "vision_tokens", *([None] * (x.ndim - 1)))


class VisionAttention(nnx.Module):
    def __init__(self, cfg: Qwen2VLConfig, *, rngs: nnx.Rngs):
        v = cfg.vision
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.num_heads = v.num_heads
        self.impl = cfg.attention_impl
        self.block = cfg.max_image_patches
        self.qkv = linear(v.embed_dim, 3 * v.embed_dim, ("vision_embed", "vision_heads"), bias=True, **kw)
        self.proj = linear(v.embed_dim, v.embed_dim, ("vision_heads", "vision_embed"), bias=True, **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, image: jax.Array) -> jax.Array:
        n = x.shape[0]
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(n, 3, self.num_heads, -1), 1, 0)
        # Rotary in float32, as the reference does, then back to the compute dtype.
        q = apply_rotary(q.astype(jnp.float32), cos, sin).astype(x.dtype)
        k = apply_rotary(k.astype(jnp.float32), cos, sin).astype(x.dtype)
        out = segment_attention(q, k, v, image, block=self.block, impl=self.impl)
        return self.proj(out.reshape(n, -1))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: Qwen2VLConfig, *, rngs: nnx.Rngs):
        v = cfg.vision
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.act = activation(v.hidden_act)
        self.fc1 = linear(v.embed_dim, v.mlp_dim, ("vision_embed", "vision_mlp"), bias=True, **kw)
        self.fc2 = linear(v.mlp_dim, v.embed_dim, ("vision_mlp", "vision_embed"), bias=True, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: Qwen2VLConfig, *, rngs: nnx.Rngs):
        kw = dict(eps=_LN_EPS, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.norm1 = layer_norm(cfg.vision.embed_dim, **kw)
        self.attn = VisionAttention(cfg, rngs=rngs)
        self.norm2 = layer_norm(cfg.vision.embed_dim, **kw)
        self.mlp = VisionMLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, image: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), cos, sin, image)
        return patch_layout(x + self.mlp(self.norm2(x)))


class PatchMerger(nnx.Module):
    """LayerNorm, then each 2x2 group of neighbouring patches concatenated and projected by a
    two-layer GELU MLP to the LLM width."""

    def __init__(self, cfg: Qwen2VLConfig, *, rngs: nnx.Rngs):
        v = cfg.vision
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.merged_dim = v.embed_dim * v.spatial_merge_size**2
        self.ln_q = layer_norm(v.embed_dim, eps=_LN_EPS, **kw)
        self.mlp_0 = linear(self.merged_dim, self.merged_dim, ("vision_embed", "merger_mlp"), bias=True, **kw)
        self.mlp_2 = linear(self.merged_dim, v.out_hidden_size, ("merger_mlp", "embed"), bias=True, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = patch_layout(self.ln_q(x).reshape(-1, self.merged_dim))
        return patch_layout(self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False)))


class PatchEmbed(nnx.Module):
    """The Conv3d with kernel == stride of the reference is a linear map of each flattened patch (Qwen3-VL's
    has a bias)."""

    def __init__(self, cfg: Qwen2VLConfig, *, rngs: nnx.Rngs, bias: bool = False):
        v = cfg.vision
        self.proj = linear(
            v.patch_dim,
            v.embed_dim,
            ("vision_patch", "vision_embed"),
            bias=bias,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            rngs=rngs,
        )

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        return self.proj(pixel_values)


class VisionTransformer(nnx.Module):
    """pixel_values [patches, 1176] and image_grid_thw [images, 3] -> merged features
    [patches / merge^2, LLM width], images in order. Rows after those the grids describe are padding
    (static batch shapes): they attend only to each other and their features come last."""

    def __init__(self, cfg: Qwen2VLConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg.vision
        self.dtype = cfg.dtype
        self.max_image_patches = cfg.max_image_patches
        self.patch_embed = PatchEmbed(cfg, rngs=rngs)
        self.blocks = LayerStack(
            lambda r: VisionBlock(cfg, rngs=r), cfg.vision.depth, scan=cfg.scan_layers, remat=cfg.remat, rngs=rngs
        )
        self.merger = PatchMerger(cfg, rngs=rngs)

    def __call__(
        self, pixel_values: jax.Array, image_grid_thw: jax.Array, image_mask: jax.Array | None = None
    ) -> jax.Array:
        """``image_mask`` [images]: the grid rows that are images (see ``Qwen2VL.embed_inputs``); only they
        are held to ``max_image_patches`` (a filler row covering batch padding may be longer)."""
        v = self.cfg
        check_patches(pixel_values, image_grid_thw, image_mask, v.patch_dim, self.max_image_patches)
        n = pixel_values.shape[0]
        padded = sharded_rows(n, v.spatial_merge_size, self.max_image_patches)
        image, rows, cols = map(patch_layout, vision_patch_positions(image_grid_thw, padded, v.spatial_merge_size))
        cos, sin = map(patch_layout, vision_cos_sin(rows, cols, v.head_dim, v.rope_theta))
        x = patch_layout(self.patch_embed(pad_rows(pixel_values, padded).astype(self.dtype)))
        x = self.blocks(x, cos, sin, image)
        return self.merger(x)[: n // v.spatial_merge_size**2]
