"""Qwen3-VL (dense) in Flax NNX: Qwen2-VL's image placement and M-RoPE position ids (the same for still
images), interleaved M-RoPE, the Qwen3 decoder and DeepStack."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mmret.models.qwen2_vl.model import Qwen2VL, Qwen2VLOutput
from mmret.models.qwen3_vl.config import Qwen3VLConfig
from mmret.models.qwen3_vl.decoder import LanguageModel
from mmret.models.qwen3_vl.rope import interleaved_mrope_cos_sin
from mmret.models.qwen3_vl.vision import VisionTransformer


class Qwen3VL(Qwen2VL):
    """The backbone; ``__call__`` as :class:`~mmret.models.qwen2_vl.model.Qwen2VL`'s."""

    vision_tower = VisionTransformer
    language_model_class = LanguageModel

    def hidden_states(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None,
        image_grid_thw: jax.Array | None,
        image_mask: jax.Array | None,
        position_ids: jax.Array,
        mask: jax.Array,
    ) -> jax.Array:
        t = self.cfg.text
        embeds = self.language_model.embed_tokens(input_ids)
        deepstack = None
        if pixel_values is not None:
            feats, deep = self.visual.with_deepstack(pixel_values, image_grid_thw, image_mask)
            is_img, idx = self.image_feature_index(input_ids, image_grid_thw, image_mask, feats.shape[0])
            embeds = jnp.where(is_img[..., None], feats.astype(embeds.dtype)[idx], embeds)
            if deep is not None:
                deepstack = jnp.where(is_img[None, ..., None], deep.astype(embeds.dtype)[:, idx], 0)
        cos, sin = interleaved_mrope_cos_sin(position_ids, t.head_dim, t.rope_theta, t.mrope_section)
        return self.language_model(embeds, cos.astype(embeds.dtype), sin.astype(embeds.dtype), mask, deepstack)


def create(cfg: Qwen3VLConfig, seed: int = 0) -> Qwen3VL:
    """A randomly initialised model."""
    return Qwen3VL(cfg, rngs=nnx.Rngs(seed))


def abstract(cfg: Qwen3VLConfig) -> Qwen3VL:
    """The model with ``jax.ShapeDtypeStruct`` leaves: nothing is allocated."""
    return nnx.eval_shape(lambda: Qwen3VL(cfg, rngs=nnx.Rngs(0)))


__all__ = ["Qwen2VLOutput", "Qwen3VL", "abstract", "create"]
