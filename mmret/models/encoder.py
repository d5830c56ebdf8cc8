"""Embedders: the backbone plus pooling and normalisation, with joint (early) or late fusion.

``joint`` (the default, one tower): images sit inside the LLM sequence and fuse with the text from
the first layer; the embedding pools the final hidden states. ``late`` (the two-leg baseline, as
UniIR's score fusion): the image embedding is the mean of the vision tower's merged features of the
image, the text embedding pools a text-only LLM pass (the same sequence with the image and its
vision-start/end tokens removed from attention and positions renumbered, which equals running the
sequence without them), and the two unit vectors are added (only the modalities an input has).

A batch is the dict :func:`mmret.data.processor.collate` makes (padded, static shapes), or a packed one
(:func:`mmret.data.packing.pack`: several examples a row, segment ids): the embeddings come out the same,
one per example in the examples' order, pooled per segment.
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


def segment_onehot(segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """[R, L, S] float32: token l of row r belongs to segment s + 1 (segment 0 is padding)."""
    return (segment_ids[..., None] == jnp.arange(1, num_segments + 1)).astype(jnp.float32)


def segment_mean(hidden: jax.Array, segment_ids: jax.Array, weights: jax.Array, num_segments: int) -> jax.Array:
    """[R, S, D]: per segment of each row, the mean of ``hidden`` [R, L, D] over its tokens where ``weights``
    [R, L] is 1 (float32; 0 for a segment with none)."""
    onehot = segment_onehot(segment_ids, num_segments) * weights.astype(jnp.float32)[..., None]
    sums = jnp.einsum("rls,rld->rsd", onehot, hidden.astype(jnp.float32))
    return sums / jnp.maximum(jnp.sum(onehot, axis=1), 1.0)[..., None]


def segment_last(hidden: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """[R, S, D]: the hidden state of each segment's last token (float32)."""
    index = jnp.arange(segment_ids.shape[1])[None, :, None]
    last = jnp.max(jnp.where(segment_onehot(segment_ids, num_segments) > 0, index, 0), axis=1)  # [R, S]
    return jnp.take_along_axis(hidden, last[..., None], axis=1).astype(jnp.float32)


def by_example(per_segment: jax.Array, slot: jax.Array) -> jax.Array:
    """Per-segment values [R, S, ...] -> per example [B, ...] (``slot``: row * S + segment - 1)."""
    return per_segment.reshape(-1, *per_segment.shape[2:])[slot]


def segment_positions(segment_ids: jax.Array, weights: jax.Array) -> jax.Array:
    """[R, L] int32: each token's count of ``weights`` tokens before it in its own segment (the position ids
    of a sequence made of the ``weights`` tokens alone, numbered from 0 per segment)."""
    w = weights.astype(jnp.int32)
    before = jnp.cumsum(w, axis=1) - w
    prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    start = (segment_ids != prev) & (segment_ids > 0)
    return before - jax.lax.cummax(jnp.where(start, before, 0), axis=1)


def forward(backbone: BackboneModel, batch: dict[str, Any], *, causal: bool) -> Any:
    """``backbone`` on a collated batch (:func:`mmret.data.processor.collate`'s keys, or a packed one's)."""
    return backbone(
        batch["input_ids"],
        batch["attention_mask"],
        batch.get("pixel_values"),
        batch.get("image_grid_thw"),
        batch.get("position_ids"),
        image_mask=batch.get("image_mask"),
        causal=causal,
        **({"segment_ids": batch["segment_ids"]} if "segment_ids" in batch else {}),
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

    def _pool_segments(self, hidden: jax.Array, segment_ids: jax.Array, pool_mask: jax.Array, s: int) -> jax.Array:
        if self.cfg.pooling == "last":
            return segment_last(hidden, segment_ids, s)
        return segment_mean(hidden, segment_ids, pool_mask, s)

    def _joint(self, batch: dict[str, Any]) -> jax.Array:
        out = forward(self.backbone, batch, causal=self.cfg.attention == "causal")
        if "slot" in batch:
            s = batch["segment_lengths"].shape[-1]
            pooled = self._pool_segments(out.last_hidden_state, batch["segment_ids"], batch["pool_mask"], s)
            return by_example(pooled, batch["slot"])
        return self._pool(out.last_hidden_state, batch["attention_mask"], batch["pool_mask"])

    def _late(self, batch: dict[str, Any]) -> jax.Array:
        cfg = self.backbone.cfg
        ids, attn = batch["input_ids"], batch["attention_mask"]
        packed = "slot" in batch
        vision_tokens = (
            (ids == cfg.image_token_id) | (ids == cfg.vision_start_token_id) | (ids == cfg.vision_end_token_id)
        )
        text_attn = attn * (~vision_tokens).astype(attn.dtype)
        segments = batch["segment_ids"] if packed else attn
        positions = jnp.where(text_attn > 0, segment_positions(segments, text_attn), 0)
        positions = jnp.broadcast_to(positions[None], (3, *ids.shape))
        causal = self.cfg.attention == "causal"
        if packed:
            s = batch["segment_lengths"].shape[-1]
            text_segments = segments * text_attn
            hidden = self.backbone(ids, text_attn, None, None, positions, causal=causal, segment_ids=text_segments)
            pooled = self._pool_segments(hidden.last_hidden_state, text_segments, batch["pool_mask"] * text_attn, s)
            text_emb = by_example(pooled, batch["slot"])
        else:
            hidden = self.backbone(ids, text_attn, None, None, positions, causal=causal)
            text_emb = self._pool(hidden.last_hidden_state, text_attn, batch["pool_mask"] * text_attn)
        has_text = batch["text_tokens"] > 0
        if batch.get("pixel_values") is None:
            return text_emb
        is_img = ids == cfg.image_token_id
        feats = self.backbone.embed_inputs(ids, batch["pixel_values"], batch["image_grid_thw"], batch.get("image_mask"))
        if packed:
            image_emb = by_example(segment_mean(feats, segments, is_img, s), batch["slot"])
            has_image = by_example(jnp.einsum("rls,rl->rs", segment_onehot(segments, s), is_img), batch["slot"]) > 0
        else:
            image_emb = mean_pool(feats, is_img)
            has_image = is_img.any(axis=1)
        fused = has_text[:, None] * l2_normalize(text_emb) + has_image[:, None] * l2_normalize(image_emb)
        return fused
