"""Qwen2-VL in Flax NNX: vision tower + Qwen2 decoder, image features placed at <|image_pad|>."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from mmret.models.params import count_params
from mmret.models.partitioning import logical
from mmret.models.qwen2_vl.attention import padding_mask
from mmret.models.qwen2_vl.config import Qwen2VLConfig
from mmret.models.qwen2_vl.decoder import DecoderLayer
from mmret.models.qwen2_vl.layer_stack import LayerStack
from mmret.models.qwen2_vl.layers import INIT_STD, RMSNorm, linear
from mmret.models.qwen2_vl.position_ids import mrope_position_ids
from mmret.models.qwen2_vl.rope import mrope_cos_sin
from mmret.models.qwen2_vl.vision import VisionTransformer


@struct.dataclass
class Qwen2VLOutput:
    last_hidden_state: jax.Array  # [batch, length, hidden]
    logits: jax.Array | None = None  # [batch, length, vocab] when the LM head is present


class LanguageModel(nnx.Module):
    """Token embedding, decoder layers (:attr:`layer_class`) and the final norm."""

    layer_class: type[nnx.Module] = DecoderLayer

    def __init__(self, cfg: Qwen2VLConfig, *, rngs: nnx.Rngs):
        t = cfg.text
        self.embed_tokens = nnx.Embed(
            t.vocab_size,
            t.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=logical(nnx.initializers.normal(INIT_STD), "vocab", "embed"),
            rngs=rngs,
        )
        self.layers = LayerStack(
            lambda r: self.layer_class(cfg, rngs=r),
            t.num_hidden_layers,
            scan=cfg.scan_layers,
            remat=cfg.remat,
            rngs=rngs,
        )
        self.norm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, embeds: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        return self.norm(self.layers(embeds, cos, sin, mask))


class Qwen2VL(nnx.Module):
    """The backbone. ``__call__`` takes what the Hugging Face model takes: input_ids [B, L],
    attention_mask [B, L] (1 = token, 0 = pad; left or right padding), pixel_values [patches, 1176]
    and image_grid_thw [images, 3] as the Hugging Face processor emits them. Families that differ only in
    the vision tower (Qwen2.5-VL) subclass it and set :attr:`vision_tower`."""

    vision_tower: type[nnx.Module] = VisionTransformer
    language_model_class: type[nnx.Module] = LanguageModel

    def __init__(self, cfg: Qwen2VLConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.visual = self.vision_tower(cfg, rngs=rngs)
        self.language_model = self.language_model_class(cfg, rngs=rngs)
        if cfg.with_lm_head and not cfg.text.tie_word_embeddings:
            self.lm_head = linear(
                cfg.text.hidden_size,
                cfg.text.vocab_size,
                ("embed", "vocab"),
                bias=False,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                rngs=rngs,
            )
        else:
            self.lm_head = None

    def embed_inputs(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None,
        image_grid_thw: jax.Array | None,
        image_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Token embeddings with the vision tower's features written over the <|image_pad|> tokens.

        ``image_mask`` [images] marks the grid rows that are images the tokens refer to; other rows
        (fillers that cover padding patch rows, so that each host's block of a global batch stays
        aligned) produce features no token takes. Tokens take the images' features in order.
        """
        embeds = self.language_model.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        feats = self.visual(pixel_values, image_grid_thw, image_mask).astype(embeds.dtype)
        is_img, idx = self.image_feature_index(input_ids, image_grid_thw, image_mask, feats.shape[0])
        return jnp.where(is_img[..., None], feats[idx], embeds)

    def image_feature_index(
        self, input_ids: jax.Array, image_grid_thw: jax.Array, image_mask: jax.Array | None, num_features: int
    ) -> tuple[jax.Array, jax.Array]:
        """``(is_img, idx)`` [B, L]: which tokens are image tokens and the row of the vision tower's merged
        features [num_features, d] each takes (the k-th image token the k-th feature of the images the
        tokens refer to, skipping filler grid rows). A ``ValueError`` when the counts disagree (concrete inputs)."""
        is_img = input_ids == self.cfg.image_token_id
        merge = self.cfg.vision.spatial_merge_size**2
        grid = jnp.asarray(image_grid_thw).astype(jnp.int32)
        feats_per_row = grid[:, 0] * grid[:, 1] * grid[:, 2] // merge
        tokens_per_row = feats_per_row if image_mask is None else feats_per_row * (jnp.asarray(image_mask) > 0)
        concrete = not any(isinstance(x, jax.core.Tracer) for x in (is_img, tokens_per_row))
        if concrete and int(is_img.sum()) != int(tokens_per_row.sum()):
            raise ValueError(
                f"image features and image tokens do not match: {int(is_img.sum())} <|image_pad|> tokens, "
                f"{int(tokens_per_row.sum())} features from image_grid_thw"
            )
        ordinal = (jnp.cumsum(is_img.reshape(-1)) - 1).reshape(is_img.shape)  # k-th image token overall
        token_end = jnp.cumsum(tokens_per_row)
        row = jnp.clip(jnp.searchsorted(token_end, ordinal, side="right"), 0, grid.shape[0] - 1)
        within = ordinal - (token_end[row] - tokens_per_row[row])
        feat_start = jnp.cumsum(feats_per_row) - feats_per_row
        return is_img, jnp.clip(feat_start[row] + within, 0, num_features - 1)

    def position_ids(
        self, input_ids: jax.Array, attention_mask: jax.Array | None, image_grid_thw: jax.Array | None
    ) -> jax.Array:
        return mrope_position_ids(
            input_ids,
            attention_mask,
            image_grid_thw,
            image_token_id=self.cfg.image_token_id,
            spatial_merge_size=self.cfg.vision.spatial_merge_size,
            xp=jnp,
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        image_grid_thw: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        image_mask: jax.Array | None = None,
        causal: bool | None = None,
        segment_ids: jax.Array | None = None,
    ) -> Qwen2VLOutput:
        """``causal`` overrides the configured attention mode (True: causal, False: bidirectional).
        ``image_mask``: see :meth:`embed_inputs` (static batches with filler grid rows). ``segment_ids``
        [B, L]: packed rows (:mod:`mmret.data.packing`), attention stays inside a segment; they need the
        examples' own ``position_ids``."""
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError("pixel_values and image_grid_thw come together")
        if position_ids is None:
            if segment_ids is not None:
                raise ValueError("packed rows (segment_ids) need position_ids: each example's own, from the processor")
            position_ids = self.position_ids(input_ids, attention_mask, image_grid_thw)
        causal = self.cfg.attention == "causal" if causal is None else causal
        mask = padding_mask(attention_mask, causal=causal, segment_ids=segment_ids)
        hidden = self.hidden_states(input_ids, pixel_values, image_grid_thw, image_mask, position_ids, mask)
        logits = self.logits(hidden) if self.cfg.with_lm_head else None
        return Qwen2VLOutput(last_hidden_state=hidden, logits=logits)

    def hidden_states(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None,
        image_grid_thw: jax.Array | None,
        image_mask: jax.Array | None,
        position_ids: jax.Array,
        mask: jax.Array,
    ) -> jax.Array:
        """The decoder's final (normed) hidden states [B, L, hidden] for prepared inputs (``mask``: the
        [B, 1, L, L] attention mask)."""
        t = self.cfg.text
        embeds = self.embed_inputs(input_ids, pixel_values, image_grid_thw, image_mask)
        cos, sin = mrope_cos_sin(position_ids, t.head_dim, t.rope_theta, t.mrope_section)
        return self.language_model(embeds, cos.astype(embeds.dtype), sin.astype(embeds.dtype), mask)

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return self.language_model.embed_tokens.attend(hidden)


def create(cfg: Qwen2VLConfig, seed: int = 0) -> Qwen2VL:
    """A randomly initialised model."""
    return Qwen2VL(cfg, rngs=nnx.Rngs(seed))


def abstract(cfg: Qwen2VLConfig) -> Qwen2VL:
    """The model with ``jax.ShapeDtypeStruct`` leaves: nothing is allocated."""
    return nnx.eval_shape(lambda: Qwen2VL(cfg, rngs=nnx.Rngs(0)))


__all__ = ["LanguageModel", "Qwen2VL", "Qwen2VLOutput", "abstract", "count_params", "create"]
