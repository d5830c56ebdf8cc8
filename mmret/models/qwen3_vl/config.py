"""Qwen3-VL (dense) configuration: the architecture (from a Hugging Face config.json) plus Qwen2-VL's run
options."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from mmret.models.qwen2_vl.config import Qwen2VLConfig

__all__ = ["Qwen3VLConfig", "TextConfig", "VisionConfig"]


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The Qwen3-VL ViT: patch 16 (with a bias), learned position embeddings interpolated to each grid on top
    of 2D RoPE, LayerNorm and tanh-GELU MLPs, the 2x2 merger, and DeepStack mergers after some blocks."""

    depth: int = 27
    embed_dim: int = 1152  # config.json's vision_config.hidden_size
    num_heads: int = 16
    intermediate_size: int = 4304
    hidden_act: str = "gelu_pytorch_tanh"
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 4096
    rope_theta: float = 10000.0
    num_position_embeddings: int = 2304  # a 48 x 48 table
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def grid_side(self) -> int:
        """Side of the square position-embedding table."""
        return math.isqrt(self.num_position_embeddings)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen3 decoder: q/k RMSNorm per head, no attention biases, an explicit head_dim, interleaved M-RoPE."""

    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5000000.0
    mrope_section: tuple[int, ...] = (24, 20, 20)
    hidden_act: str = "silu"
    tie_word_embeddings: bool = True
    attention_bias: bool = False


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig(Qwen2VLConfig):
    """Architecture (:class:`VisionConfig`, :class:`TextConfig`, token ids) plus Qwen2-VL's run options."""

    model_type: ClassVar[str] = "qwen3_vl"

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)  # type: ignore[assignment]
    text: TextConfig = dataclasses.field(default_factory=TextConfig)  # type: ignore[assignment]

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **options: Any) -> Qwen3VLConfig:
        """Build from a Hugging Face ``config.json`` dict (nested ``text_config`` / ``vision_config``)."""
        model_type = hf.get("model_type")
        if model_type not in (None, cls.model_type):
            raise ValueError(f"unsupported architecture: model_type={model_type!r} (only {cls.model_type!r})")
        text = {**hf, **(hf.get("text_config") or {})}
        vis = hf.get("vision_config") or {}
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
            raise ValueError(f"unsupported rope type {rope.get('rope_type')!r}")
        if not rope.get("mrope_interleaved", True):
            raise ValueError("text_config.rope_parameters.mrope_interleaved=false: Qwen3-VL interleaves its sections")
        heads = text["num_attention_heads"]
        text_cfg = TextConfig(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_hidden_layers=text["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or text["hidden_size"] // heads,
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", text.get("rope_theta", 5000000.0)),
            mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
            hidden_act=text.get("hidden_act", "silu"),
            tie_word_embeddings=hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)),
            attention_bias=text.get("attention_bias", False),
        )
        if heads % text_cfg.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        if 2 * sum(text_cfg.mrope_section) != text_cfg.head_dim:
            raise ValueError(
                f"mrope_section {text_cfg.mrope_section} must sum to head_dim/2 = {text_cfg.head_dim // 2}"
            )
        vision = VisionConfig(
            depth=vis.get("depth", 27),
            embed_dim=vis.get("hidden_size", 1152),
            num_heads=vis.get("num_heads", 16),
            intermediate_size=vis.get("intermediate_size", 4304),
            hidden_act=vis.get("hidden_act", "gelu_pytorch_tanh"),
            in_channels=vis.get("in_channels", 3),
            patch_size=vis.get("patch_size", 16),
            temporal_patch_size=vis.get("temporal_patch_size", 2),
            spatial_merge_size=vis.get("spatial_merge_size", 2),
            out_hidden_size=vis.get("out_hidden_size", text_cfg.hidden_size),
            rope_theta=(vis.get("rope_parameters") or {}).get("rope_theta", 10000.0),
            num_position_embeddings=vis.get("num_position_embeddings", 2304),
            deepstack_visual_indexes=tuple(vis.get("deepstack_visual_indexes", (8, 16, 24))),
        )
        if vision.grid_side**2 != vision.num_position_embeddings:
            raise ValueError(f"vision_config.num_position_embeddings={vision.num_position_embeddings} is not a square")
        bad = [i for i in vision.deepstack_visual_indexes if not 0 <= i < vision.depth]
        if bad or list(vision.deepstack_visual_indexes) != sorted(set(vision.deepstack_visual_indexes)):
            raise ValueError(
                f"vision_config.deepstack_visual_indexes {list(vision.deepstack_visual_indexes)} must be increasing "
                f"blocks of a depth-{vision.depth} tower"
            )
        if len(vision.deepstack_visual_indexes) > text_cfg.num_hidden_layers:
            raise ValueError("more DeepStack features than decoder layers to add them to")
        ids = {
            k: hf.get(k, text.get(k))
            for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        }
        cfg = cls(vision=vision, text=text_cfg, **{k: v for k, v in ids.items() if v is not None})
        return cfg.replace(**options) if options else cfg
