"""Qwen2-VL's backbone spec (registered under the Hugging Face model_type ``qwen2_vl``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmret.models.backbone import Backbone, ImagePatching, SpecialTokens, Token
from mmret.models.qwen2_vl import presets
from mmret.models.qwen2_vl.config import Qwen2VLConfig
from mmret.models.qwen2_vl.model import Qwen2VL
from mmret.models.qwen2_vl.position_ids import mrope_position_ids
from mmret.models.qwen2_vl.processor_files import (
    DEFAULT_SYSTEM_PROMPT,
    IMAGE_MAX_PIXELS,
    IMAGE_MIN_PIXELS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    SPECIAL_TOKENS,
)
from mmret.models.qwen2_vl.processor_files import write_processor_files as _write_files


def _token(text: str) -> Token:
    return Token(text, SPECIAL_TOKENS[text])


def write_processor_files(out_dir: Path, hf: Mapping[str, Any]) -> list[Path]:
    """The offline Qwen2 tokenizer files and a ``preprocessor_config.json`` matching ``hf``'s vision config."""
    vision = hf.get("vision_config") or {}
    return _write_files(
        out_dir,
        patch_size=vision.get("patch_size", 14),
        temporal_patch_size=vision.get("temporal_patch_size", 2),
        merge_size=vision.get("spatial_merge_size", 2),
    )


BACKBONE = Backbone(
    model_type="qwen2_vl",
    name="Qwen2-VL",
    config_class=Qwen2VLConfig,
    model_class=Qwen2VL,
    position_ids=mrope_position_ids,
    patching=ImagePatching(
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=tuple(OPENAI_CLIP_MEAN),
        image_std=tuple(OPENAI_CLIP_STD),
        min_pixels=IMAGE_MIN_PIXELS,
        max_pixels=IMAGE_MAX_PIXELS,
    ),
    tokens=SpecialTokens(
        image_pad=_token("<|image_pad|>"),
        vision_start=_token("<|vision_start|>"),
        vision_end=_token("<|vision_end|>"),
        video_pad=_token("<|video_pad|>"),
        pad=_token("<|endoftext|>"),
        eos=_token("<|im_end|>"),
    ),
    presets=tuple(presets.PRESETS),
    test_presets=("tiny", "small"),
    preset_config=presets.hf_config,
    hf_model_class="Qwen2VLForConditionalGeneration",
    embed_path=("language_model", "embed_tokens", "embedding"),
    lm_head_path=("lm_head", "kernel"),
    write_processor_files=write_processor_files,
    default_system_prompt=DEFAULT_SYSTEM_PROMPT,  # Qwen2-VL's (and Qwen2.5-VL's) chat template adds it
)
