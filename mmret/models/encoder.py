"""Embedders: the backbone plus pooling and normalisation, with joint (early) or late fusion.

``joint`` (the default, one tower): images sit inside the LLM sequence and fuse with the text from
the first layer; the embedding pools the final hidden states. ``late`` (the two-leg baseline, as
UniIR's score fusion): the image embedding is the mean of the vision tower's merged features of the
image, the text embedding pools a text-only LLM pass (the same sequence with the image and its
vision-start/end tokens removed from attention and positions renumbered, which equals running the
sequence without them), and the two unit vectors are added (only the modalities an input has).

A batch is the dict :func:`mmret.data.processor.collate` makes (padded, static shapes).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from mmret.losses import l2_normalize
from mmret.models.interface import BackboneModel

Pooling = Literal["mean", "last"]
Fusion = Literal["joint", "late"]


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    pooling: Pooling = "mean"  # mean over the pool mask, or the last non-pad token
    attention: Literal["causal", "bidirectional"] = "bidirectional"
    fusion: Fusion = "joint"
    normalize: bool = True

    def __post_init__(self) -> None:
        for field, allowed in (
            ("pooling", ("mean", "last")),
            ("attention", ("causal", "bidirectional")),
            ("fusion", ("joint", "late")),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(f"encoder.{field} must be one of {allowed}, got {getattr(self, field)!r}")


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``hidden`` [B, L, D] over the tokens where ``mask`` [B, L] is 1 (float32)."""
    m = mask.astype(jnp.float32)[..., None]
    return jnp.sum(hidden.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def last_token_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """The hidden state of each row's last non-pad token (left or right padding)."""
    length = attention_mask.shape[1]
    last = length - 1 - jnp.argmax(attention_mask[:, ::-1] > 0, axis=1)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)


def forward(backbone: BackboneModel, batch: dict[str, Any], *, causal: bool) -> Any:
    """``backbone`` on a collated batch (:func:`mmret.data.processor.collate`'s keys)."""
    return backbone(
        batch["input_ids"],
        batch["attention_mask"],
        batch.get("pixel_values"),
        batch.get("image_grid_thw"),
        batch.get("position_ids"),
        image_mask=batch.get("image_mask"),
        causal=causal,
    )


class Encoder(nnx.Module):
    """Backbone + pooling: ``encoder(batch) -> [B, hidden]`` embeddings (float32)."""

    def __init__(self, backbone: BackboneModel, cfg: EncoderConfig = EncoderConfig()):
        self.backbone = backbone
        self.cfg = cfg

    def _pool(self, hidden: jax.Array, attention_mask: jax.Array, pool_mask: jax.Array) -> jax.Array:
        if self.cfg.pooling == "last":
            return last_token_pool(hidden, attention_mask)
        return mean_pool(hidden, pool_mask)

    def __call__(self, batch: dict[str, Any]) -> jax.Array:
        emb = self._joint(batch) if self.cfg.fusion == "joint" else self._late(batch)
        return l2_normalize(emb) if self.cfg.normalize else emb

    def _joint(self, batch: dict[str, Any]) -> jax.Array:
        out = forward(self.backbone, batch, causal=self.cfg.attention == "causal")
        return self._pool(out.last_hidden_state, batch["attention_mask"], batch["pool_mask"])

    def _late(self, batch: dict[str, Any]) -> jax.Array:
        cfg = self.backbone.cfg
        ids, attn = batch["input_ids"], batch["attention_mask"]
        vision_tokens = (
            (ids == cfg.image_token_id) | (ids == cfg.vision_start_token_id) | (ids == cfg.vision_end_token_id)
        )
        text_attn = attn * (~vision_tokens).astype(attn.dtype)
        positions = jnp.cumsum(text_attn, axis=1) - 1
        positions = jnp.broadcast_to(jnp.where(text_attn > 0, positions, 0)[None], (3, *ids.shape))
        hidden = self.backbone(ids, text_attn, None, None, positions, causal=self.cfg.attention == "causal")
        text_emb = self._pool(hidden.last_hidden_state, text_attn, batch["pool_mask"] * text_attn)
        has_text = batch["text_tokens"] > 0
        is_img = ids == cfg.image_token_id
        has_image = is_img.any(axis=1)
        if batch.get("pixel_values") is None:
            return text_emb
        feats = self.backbone.embed_inputs(ids, batch["pixel_values"], batch["image_grid_thw"], batch.get("image_mask"))
        image_emb = mean_pool(feats, is_img)
        fused = has_text[:, None] * l2_normalize(text_emb) + has_image[:, None] * l2_normalize(image_emb)
        return fused
