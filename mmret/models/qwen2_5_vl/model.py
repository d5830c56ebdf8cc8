"""Qwen2.5-VL in Flax NNX: Qwen2-VL's decoder, image placement and M-RoPE with the Qwen2.5-VL vision tower.

For still images the decoder's position ids are Qwen2-VL's (Hugging Face's ``get_rope_index`` differs only
in the time ids of videos), so everything but the tower is :class:`~mmret.models.qwen2_vl.model.Qwen2VL`.
"""

from __future__ import annotations

from flax import nnx

from mmret.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from mmret.models.qwen2_5_vl.vision import VisionTransformer
from mmret.models.qwen2_vl.model import Qwen2VL, Qwen2VLOutput


class Qwen2_5_VL(Qwen2VL):
    """The backbone; ``__call__`` as :class:`~mmret.models.qwen2_vl.model.Qwen2VL`'s."""

    vision_tower = VisionTransformer


def create(cfg: Qwen2_5_VLConfig, seed: int = 0) -> Qwen2_5_VL:
    """A randomly initialised model."""
    return Qwen2_5_VL(cfg, rngs=nnx.Rngs(seed))


def abstract(cfg: Qwen2_5_VLConfig) -> Qwen2_5_VL:
    """The model with ``jax.ShapeDtypeStruct`` leaves: nothing is allocated."""
    return nnx.eval_shape(lambda: Qwen2_5_VL(cfg, rngs=nnx.Rngs(0)))


__all__ = ["Qwen2VLOutput", "Qwen2_5_VL", "abstract", "create"]
