"""Qwen2.5-VL configuration: Qwen2-VL's decoder and run options with the Qwen2.5-VL vision tower."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from mmret.models.qwen2_vl.config import Qwen2VLConfig, TextConfig

__all__ = ["Qwen2_5_VLConfig", "TextConfig", "VisionConfig"]


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The Qwen2.5-VL ViT: RMSNorm, gated SiLU MLPs, window attention but in ``fullatt_block_indexes``."""

    depth: int = 32
    embed_dim: int = 1280  # config.json's vision_config.hidden_size
    num_heads: int = 16
    intermediate_size: int = 3420
    hidden_act: str = "silu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 2048  # the LLM width the merger projects to
    rope_theta: float = 10000.0
    window_size: int = 112  # pixels per window side
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: int = 2  # video time ids only (mmret embeds still images)

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
    def window(self) -> int:
        """Merged tokens per window side (Hugging Face's ``vit_merger_window_size``)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def window_patches(self) -> int:
        """Patches in a whole window."""
        return (self.window * self.spatial_merge_size) ** 2


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig(Qwen2VLConfig):
    """Qwen2-VL's config (decoder, token ids, run options) with :class:`VisionConfig`."""

    model_type: ClassVar[str] = "qwen2_5_vl"

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)  # type: ignore[assignment]

    @classmethod
    def vision_from_hf(cls, vis: dict[str, Any], text: dict[str, Any]) -> VisionConfig:  # type: ignore[override]
        cfg = VisionConfig(
            depth=vis.get("depth", 32),
            embed_dim=vis.get("hidden_size", 1280),
            num_heads=vis.get("num_heads", 16),
            intermediate_size=vis.get("intermediate_size", 3420),
            hidden_act=vis.get("hidden_act", "silu"),
            in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
            patch_size=vis.get("patch_size", 14),
            temporal_patch_size=vis.get("temporal_patch_size", 2),
            spatial_merge_size=vis.get("spatial_merge_size", 2),
            out_hidden_size=vis.get("out_hidden_size", text["hidden_size"]),
            rope_theta=(vis.get("rope_parameters") or {}).get("rope_theta", 10000.0),
            window_size=vis.get("window_size", 112),
            fullatt_block_indexes=tuple(vis.get("fullatt_block_indexes", (7, 15, 23, 31))),
            tokens_per_second=vis.get("tokens_per_second", 2),
        )
        if cfg.window < 1:
            raise ValueError(
                f"vision_config.window_size={cfg.window_size} is smaller than one merged token "
                f"({cfg.spatial_merge_size * cfg.patch_size} pixels)"
            )
        bad = [i for i in cfg.fullatt_block_indexes if not 0 <= i < cfg.depth]
        if bad:
            raise ValueError(f"vision_config.fullatt_block_indexes {bad} are not blocks of a depth-{cfg.depth} tower")
        return cfg
