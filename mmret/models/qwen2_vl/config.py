"""Qwen2-VL configuration: the architecture (from a Hugging Face config.json) plus run options."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import jax.numpy as jnp

from mmret.models.options import AttentionImpl, AttentionMode, RematPolicy, as_dtype

__all__ = [
    "AttentionImpl",
    "AttentionMode",
    "Qwen2VLConfig",
    "RematPolicy",
    "TextConfig",
    "VisionConfig",
    "as_dtype",
]


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The Qwen2-VL vision tower (a ViT with 2D rotary embeddings and a 2x2 patch merger)."""

    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    hidden_act: str = "quick_gelu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 1536  # the LLM width the merger projects to
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder with multimodal rotary embeddings (M-RoPE)."""

    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    hidden_act: str = "silu"
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        # Qwen2-VL's attention derives head_dim from the width, whatever config.json says.
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    """Architecture plus the options that change how (not what) the model computes."""

    model_type: ClassVar[str] = "qwen2_vl"  # the Hugging Face config.json's model_type

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    # Run options.
    attention: AttentionMode = "causal"
    attention_impl: AttentionImpl = "xla"
    # The most patches one image has (the processor's max_pixels / patch_size^2): the vision tower then
    # attends within blocks of this many patches instead of across the whole batch. 0: no bound.
    max_image_patches: int = 0
    scan_layers: bool = True
    remat: RematPolicy = "none"
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    with_lm_head: bool = False

    def replace(self, **kwargs: Any) -> Qwen2VLConfig:
        if "dtype" in kwargs:
            kwargs["dtype"] = as_dtype(kwargs["dtype"])
        if "param_dtype" in kwargs:
            kwargs["param_dtype"] = as_dtype(kwargs["param_dtype"])
        return dataclasses.replace(self, **kwargs)

    @property
    def hidden_size(self) -> int:
        """Width of the decoder's hidden states (the embedding size before any projection)."""
        return self.text.hidden_size

    @property
    def vocab_size(self) -> int:
        """Rows of the token embedding."""
        return self.text.vocab_size

    @property
    def tie_word_embeddings(self) -> bool:
        """Whether the LM head is the token embedding (no ``lm_head`` parameter)."""
        return self.text.tie_word_embeddings

    def with_vocab_size(self, vocab_size: int) -> Qwen2VLConfig:
        """The same config with ``vocab_size`` token-embedding rows."""
        return self.replace(text=dataclasses.replace(self.text, vocab_size=vocab_size))

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **options: Any) -> Qwen2VLConfig:
        """Build from a Hugging Face ``config.json`` dict (classic or transformers-5 layout)."""
        model_type = hf.get("model_type")
        if model_type not in (None, cls.model_type):
            raise ValueError(f"unsupported architecture: model_type={model_type!r} (only {cls.model_type!r})")
        text = {**hf, **(hf.get("text_config") or {})}
        vis = hf.get("vision_config") or {}
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        vision = cls.vision_from_hf(vis, text)
        text_cfg = TextConfig(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_hidden_layers=text["num_hidden_layers"],
            num_attention_heads=text["num_attention_heads"],
            num_key_value_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", text.get("rope_theta", 1000000.0)),
            mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
            hidden_act=text.get("hidden_act", "silu"),
            tie_word_embeddings=hf.get("tie_word_embeddings", text.get("tie_word_embeddings", True)),
        )
        if text.get("use_sliding_window"):
            raise ValueError("unsupported: use_sliding_window=true (Qwen2-VL checkpoints do not use it)")
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
            raise ValueError(f"unsupported rope type {rope.get('rope_type')!r}")
        if text_cfg.hidden_size % text_cfg.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if text_cfg.num_attention_heads % text_cfg.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        if 2 * sum(text_cfg.mrope_section) != text_cfg.head_dim:
            raise ValueError(
                f"mrope_section {text_cfg.mrope_section} must sum to head_dim/2 = {text_cfg.head_dim // 2}"
            )
        ids = {
            k: text.get(k, hf.get(k))
            for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        }
        ids = {k: v for k, v in ids.items() if v is not None}
        cfg = cls(vision=vision, text=text_cfg, **ids)
        return cfg.replace(**options) if options else cfg

    @classmethod
    def vision_from_hf(cls, vis: dict[str, Any], text: dict[str, Any]) -> VisionConfig:
        """The vision tower's config from config.json's ``vision_config`` (``text``: the text keys)."""
        return VisionConfig(
            depth=vis.get("depth", 32),
            embed_dim=vis.get("embed_dim", 1280),
            num_heads=vis.get("num_heads", 16),
            mlp_ratio=vis.get("mlp_ratio", 4.0),
            hidden_act=vis.get("hidden_act", "quick_gelu"),
            in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
            patch_size=vis.get("patch_size", 14),
            temporal_patch_size=vis.get("temporal_patch_size", 2),
            spatial_merge_size=vis.get("spatial_merge_size", 2),
            out_hidden_size=vis.get("hidden_size", text["hidden_size"]),
            rope_theta=(vis.get("rope_parameters") or {}).get("rope_theta", 10000.0),
        )

    @classmethod
    def from_hf_dir(cls, hf_dir: str | Path, **options: Any) -> Qwen2VLConfig:
        path = Path(hf_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json in the model directory")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_hf_dict(hf, **options)
